"""Top-k with error feedback trains as well as dense gradients; without feedback it does not."""

from __future__ import annotations

import re
import sys

import pytest

from tests.harness import horderun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def accuracy(*flags: str) -> float:
    result = horderun("-np", "2", "--log-level", "WARNING", "--coordinator", "none",
                      sys.executable, "examples/pytorch_digits.py", *flags, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"final test accuracy: ([\d.]+)%", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


def test_topk_with_error_feedback_matches_dense_and_the_ablation_does_not() -> None:
    dense = accuracy()
    topk_1 = accuracy("--topk", "0.01")
    topk_01 = accuracy("--topk", "0.001", "--topk-warmup", "100")
    ablation = accuracy("--topk", "0.01", "--no-error-feedback")
    print(f"dense {dense:.2f}%  top-k 1% {topk_1:.2f}%  top-k 0.1% {topk_01:.2f}%  "
          f"top-k 1% without error feedback {ablation:.2f}%")
    assert topk_1 >= dense - 1.0
    assert topk_01 >= dense - 1.0
    assert ablation <= topk_1 - 3.0, "error feedback made no visible difference"
