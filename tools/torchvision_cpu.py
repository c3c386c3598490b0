"""Import PyPI's torchvision on a CPU-only torch, whose build its C operators do not match.

torchvision's wheels on PyPI are built against CUDA torch; on torch's CPU build their C
operators (nms, roi_align, ...) do not load, and `import torchvision` then fails while
registering fake kernels for them ("operator torchvision::nms does not exist"). Horovod's
examples use none of those operators, so `install()` skips the two registration modules
in that case only; a torchvision whose operators load is left untouched.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

_REGISTRATIONS = {"torchvision._meta_registrations", "torchvision._autograd_registrations"}


class _SkipRegistrationsWithoutOps(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the registration modules as empty ones while torchvision has no operators."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        extension = sys.modules.get("torchvision.extension")  # imported first by torchvision
        if fullname not in _REGISTRATIONS or extension is None or extension._has_ops():
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        pass


def install() -> None:
    """Put the finder first on sys.meta_path (once)."""
    if not any(isinstance(f, _SkipRegistrationsWithoutOps) for f in sys.meta_path):
        sys.meta_path.insert(0, _SkipRegistrationsWithoutOps())
