"""Non-finite gradients in synchronous TensorFlow training: real `horderun -np 2` workers
(scripts/nonfinite_worker.py) fit a Keras model through `hvd.DistributedOptimizer`; one
rank's data turns its loss NaN."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install -e "
                    "'.[tensorflow]')")

from tests.harness import horderun, repo_env  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "nonfinite_worker.py")
BATCHES = 12  # steps per run (the worker's BATCHES)


def run_job(tmp_path: Path, **env: str):
    """`horderun -np 2` of the worker (killed, with its workers, after 300 s)."""
    return horderun("-np", "2", "--log-level", "WARNING", "--coordinator", "none",
                    sys.executable, SCRIPT, env=repo_env(OUT=str(tmp_path), **env), timeout=300)


def test_a_nan_loss_on_one_rank_skips_the_keras_step_on_every_rank(tmp_path: Path) -> None:
    result = run_job(tmp_path, MODES="graph,eager,tape,topk,passes", NAN_RANK="1", NAN_BATCHES="3")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for mode in ("graph", "eager", "tape", "topk", "passes"):
        assert r0[mode]["finite"] and r1[mode]["finite"], f"{mode}: the NaN reached the model"
        assert r0[mode]["weights"] == r1[mode]["weights"], f"{mode}: ranks' weights differ"
        # one update skipped on both ranks, the rest applied (passes: one per 2 batches)
        updates = BATCHES // 2 if mode == "passes" else BATCHES
        assert [r[mode]["iterations"] for r in (r0, r1)] == [updates - 1] * 2, mode
        if mode != "tape":
            assert [r[mode]["skipped"] for r in (r0, r1)] == [1, 1], mode
    # each rank warns once per run (five runs)
    assert output.count("skipped an optimizer step on every rank") == 10, output


def test_a_rank_that_keeps_producing_nan_stops_the_keras_job(tmp_path: Path) -> None:
    result = run_job(tmp_path, MODES="graph", NAN_RANK="1", NAN_BATCHES="2-",
                     HORDE_MAX_NONFINITE_STEPS="4")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "NonFiniteGradientError: the averaged gradient was non-finite (NaN/Inf) in 4 " \
           "steps in a row" in output, output
    assert "HORDE_MAX_NONFINITE_STEPS=4" in output
    assert not (tmp_path / "rank0.json").exists()


@pytest.mark.parametrize("modes", ["sparse,sparse_all", "sparse_tape"])
def test_a_nan_loss_on_one_rank_skips_a_sparse_top_k_step_on_every_rank(
        tmp_path: Path, modes: str) -> None:
    # Genuinely sparse top-k (density 0.1 is below the allgather's break-even): each rank
    # sees the other's payload. A diverged loss is not an attack: like the dense path and
    # PyTorch's synchronous top-k, the step is skipped on every rank and counted; nobody's
    # payload is rejected, and a rank whose whole gradient is sparse (`sparse_all`) still
    # makes the others skip rather than averaging without it.
    result = run_job(tmp_path, MODES=modes, NAN_RANK="1", NAN_BATCHES="3")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for mode in modes.split(","):
        assert r0[mode]["finite"] and r1[mode]["finite"], f"{mode}: the NaN reached the model"
        assert r0[mode]["weights"] == r1[mode]["weights"], f"{mode}: ranks' weights differ"
        assert [r[mode]["iterations"] for r in (r0, r1)] == [BATCHES - 1] * 2, mode
        assert [r[mode]["skipped"] for r in (r0, r1)] == [1, 1], mode
        stats = [r[mode]["topk"] for r in (r0, r1)]
        assert [s["rounds"] for s in stats] == [BATCHES] * 2, (mode, stats)
        assert [s["bytes_sent"] < s["dense_bytes"] for s in stats] == [True] * 2, stats
        assert [s["rejected"] for s in stats] == [0, 0], (mode, stats)
    assert output.count("skipped an optimizer step on every rank") == 2 * len(modes.split(",")), \
        output
    assert "rejected the gradient of rank" not in output, output


def test_a_rank_that_keeps_producing_nan_stops_a_sparse_top_k_job(tmp_path: Path) -> None:
    result = run_job(tmp_path, MODES="sparse", NAN_RANK="1", NAN_BATCHES="2-",
                     HORDE_MAX_NONFINITE_STEPS="4")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "NonFiniteGradientError: the averaged gradient was non-finite (NaN/Inf) in 4 " \
           "steps in a row" in output, output
    assert "rejected the gradient of rank" not in output, output
    assert not (tmp_path / "rank0.json").exists()
