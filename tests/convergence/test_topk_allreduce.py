"""The allreduce-level top-k API conserves the gradient mass across real processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.harness import horderun


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_topk_allreduce_sent_plus_residual_is_the_dense_average() -> None:
    script = Path(__file__).resolve().parent / "scripts" / "topk_allreduce_mass.py"
    result = horderun("-np", "2", "--log-level", "WARNING", sys.executable, str(script),
                      timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("mass error") == 4  # two ranks, plain and warm-up
