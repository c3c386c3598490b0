"""The examples train to the accuracy their docstrings state, under horderun."""

from __future__ import annotations

import math
import re
import sqlite3
import sys
from pathlib import Path

import pytest

from tests.harness import horderun


def run_example(*args: str) -> str:
    result = horderun(*args, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def ledger_losses(data: Path) -> list[float]:
    """The mean loss of each round the embedded coordinator's ledger holds, in order."""
    with sqlite3.connect(data / "ledger.sqlite") as conn:
        rows = conn.execute("SELECT loss_sum / loss_count FROM rounds WHERE loss_count > 0 "
                            "ORDER BY round").fetchall()
    return [float(loss) for (loss,) in rows]


def assert_loss_chart_falls(data: Path) -> None:
    """The status page's loss chart has points, and training brought the loss down."""
    losses = ledger_losses(data)
    assert len(losses) >= 10, losses
    assert all(math.isfinite(v) and v >= 0 for v in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def final_accuracy(output: str) -> float:
    match = re.search(r"final test accuracy: ([\d.]+)%", output)
    assert match, output
    return float(match.group(1)) / 100


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plain_horovod_example_reaches_95_percent(tmp_path: Path) -> None:
    out = run_example("-np", "2", "--data-dir", str(tmp_path), sys.executable,
                      "examples/pytorch_digits.py")
    assert "[0]<stdout>:epoch  1/15" in out
    assert final_accuracy(out) >= 0.95
    assert_loss_chart_falls(tmp_path)  # hvd.record_loss reached the ledger


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_elastic_example_reaches_95_percent(tmp_path: Path) -> None:
    out = run_example("-np", "2", "--min-np", "1", "--max-np", "3", "--data-dir",
                      str(tmp_path), sys.executable, "examples/pytorch_digits_elastic.py")
    assert final_accuracy(out) >= 0.95
    assert_loss_chart_falls(tmp_path)
