"""The CUDA/NCCL path: tensors stay on the GPU. Runs where GPUs exist, skips elsewhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import horderun

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "cuda_worker.py")
pytestmark = pytest.mark.gpu


def run(np: int) -> subprocess.CompletedProcess:
    return horderun("-np", str(np), "--coordinator", "none", sys.executable, SCRIPT,
                    timeout=240)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(300)
def test_cuda_collectives_on_one_gpu() -> None:
    result = run(1)
    assert result.returncode == 0, result.stderr
    assert "cuda ok 0" in result.stdout


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices for NCCL")
@pytest.mark.timeout(300)
def test_cuda_collectives_across_two_gpus() -> None:
    result = run(2)
    assert result.returncode == 0, result.stderr
    assert "cuda ok 0" in result.stdout and "cuda ok 1" in result.stdout
