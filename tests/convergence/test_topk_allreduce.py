"""The allreduce-level top-k API conserves the gradient mass across real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_topk_allreduce_sent_plus_residual_is_the_dense_average() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = Path(__file__).resolve().parent / "scripts" / "topk_allreduce_mass.py"
    result = subprocess.run([sys.executable, "-m", "elastic.launcher.cli", "-np", "2",
                             "--log-level", "WARNING", sys.executable, str(script)],
                            env=env, capture_output=True, text=True, timeout=100, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("mass error") == 2
