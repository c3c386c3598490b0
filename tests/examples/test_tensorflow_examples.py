"""The TensorFlow / Keras examples train to the accuracy their docstrings state, under horderun."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install -e "
                    "'.[tensorflow]')")

from tests.examples.test_examples import (  # noqa: E402
    assert_loss_chart_falls,
    final_accuracy,
    run_example,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_keras_example_reaches_95_percent(tmp_path: Path) -> None:
    out = run_example("-np", "2", "--data-dir", str(tmp_path), sys.executable,
                      "examples/tensorflow2_keras_digits.py")
    assert "finished gradual learning rate warmup" in out
    assert final_accuracy(out) >= 0.95
    assert_loss_chart_falls(tmp_path)  # its steps were credited and carried the loss


def test_elastic_keras_example_reaches_95_percent(tmp_path: Path) -> None:
    out = run_example("-np", "2", "--min-np", "1", "--max-np", "3", "--data-dir",
                      str(tmp_path), sys.executable, "examples/tensorflow2_keras_digits_elastic.py")
    assert final_accuracy(out) >= 0.95
    assert_loss_chart_falls(tmp_path)
