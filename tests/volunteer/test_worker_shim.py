"""The worker shim applies the volunteer's limits before the job's code runs."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import REPO
from tests.volunteer.conftest import base_env


def test_shim_sets_threads_and_no_core_dumps_then_runs_the_script(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import resource, sys, torch\n"
                      "print(torch.get_num_threads(), resource.getrlimit(resource.RLIMIT_CORE),"
                      " sys.argv[1:], __name__)\n")
    env = {**base_env(), "HORDE_CPU_THREADS": "1", "HORDE_GPU_MEMORY_FRACTION": "0.5"}
    done = subprocess.run([sys.executable, "-m", "volunteer_client.worker_shim", str(script),
                           "--epochs", "2"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1 (0, 0) ['--epochs', '2'] __main__"


def test_shim_without_a_script_says_how_to_use_it():
    done = subprocess.run([sys.executable, "-m", "volunteer_client.worker_shim"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=base_env())
    assert done.returncode == 1 and "usage: python -m volunteer_client.worker_shim" in done.stderr
