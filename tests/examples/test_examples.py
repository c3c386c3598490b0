"""The examples train to the accuracy their docstrings state, under horderun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_example(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "elastic.launcher.cli", *args], env=env,
                            capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def final_accuracy(output: str) -> float:
    match = re.search(r"final test accuracy: ([\d.]+)%", output)
    assert match, output
    return float(match.group(1)) / 100


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_horovod_example_reaches_95_percent() -> None:
    out = run_example("-np", "2", sys.executable, "examples/pytorch_digits.py")
    assert "[0]<stdout>:epoch  1/15" in out
    assert final_accuracy(out) >= 0.95


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_elastic_example_reaches_95_percent() -> None:
    out = run_example("-np", "2", "--min-np", "1", "--max-np", "3", sys.executable,
                      "examples/pytorch_digits_elastic.py")
    assert final_accuracy(out) >= 0.95
