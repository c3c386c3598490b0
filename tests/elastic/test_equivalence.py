"""N workers with batch b reach what one process reaches with batch N*b (dense, S=0)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import horderun, repo_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "equivalence.py")


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("np", [2, 3])
def test_data_parallel_equals_one_process_with_n_times_the_batch(tmp_path: Path, np: int) -> None:
    env = repo_env(GLOBAL_BATCH=str(12 * np), STEPS="15")
    multi = horderun("-np", str(np), sys.executable, SCRIPT, str(tmp_path / "multi"), env=env,
                     timeout=150)
    assert multi.returncode == 0, multi.stderr
    single = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "single")], env=env,
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert single.returncode == 0, single.stderr
    runs = [torch.load(tmp_path / f"multi.rank{r}.pt") for r in range(np)]
    reference = torch.load(tmp_path / "single.rank0.pt")
    for run in runs[1:]:
        assert run["digests"] == runs[0]["digests"], "ranks' parameters differ at some step"
    for name, value in reference["params"].items():
        torch.testing.assert_close(runs[0]["params"][name], value, rtol=1e-5, atol=1e-6)
