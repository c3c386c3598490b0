"""The examples train to the accuracy their docstrings state, under horderun."""

from __future__ import annotations

import re
import sys

import pytest

from tests.harness import horderun


def run_example(*args: str) -> str:
    result = horderun(*args, timeout=240)
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
