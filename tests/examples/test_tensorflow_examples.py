"""The TensorFlow / Keras examples train to the accuracy their docstrings state, under horderun."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install -e "
                    "'.[tensorflow]')")

from tests.examples.test_examples import final_accuracy, run_example  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_keras_example_reaches_95_percent() -> None:
    out = run_example("-np", "2", sys.executable, "examples/tensorflow2_keras_digits.py")
    assert "finished gradual learning rate warmup" in out
    assert final_accuracy(out) >= 0.95


def test_elastic_keras_example_reaches_95_percent() -> None:
    out = run_example("-np", "2", "--min-np", "1", "--max-np", "3", sys.executable,
                      "examples/tensorflow2_keras_digits_elastic.py")
    assert final_accuracy(out) >= 0.95
