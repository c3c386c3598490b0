"""Fixtures of the network lab (root only; skipped with the reason elsewhere)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab.netns import LabUnavailable, NatLab


@pytest.fixture
def lab() -> Iterator[NatLab]:
    """A public namespace and two homes behind their own masquerading routers."""
    try:
        with NatLab() as created:
            yield created
    except LabUnavailable as exc:
        pytest.skip(str(exc))
