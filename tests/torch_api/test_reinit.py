"""`hvd.shutdown()` then `hvd.init()`, again and again, as Horovod's test suites do: the
same world comes back (same node, rank and generation, a fresh engine, process sets
cleared), and the job ends only when the worker processes end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rendezvous import backend_from_url
from rendezvous.agent import read_control
from rendezvous.keys import JobKeys
from rendezvous.settings import DEFAULT_PREFIX
from tests.harness import REPO, Workers, python, repo_env, unique_job, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WORKER = Path(__file__).resolve().parent / "scripts" / "reinit_worker.py"
CYCLES = 20
LIMIT = 180.0  # seconds for the whole run: start, 20 cycles, exit (a loaded machine)
COLLECTIVE_TIMEOUT = 120.0


def test_shutdown_and_init_twenty_times_give_the_same_world_back(
        etcd_server: Any, tmp_path: Path) -> None:
    np = 3
    job = unique_job("reinit")
    # rank 2 never calls shutdown after its last cycle: it just exits
    env = worker_env(etcd_server.url, job, np, extra={
        "HORDE_TEST_OUT": str(tmp_path), "REINIT_CYCLES": str(CYCLES),
        "REINIT_NO_FINAL_SHUTDOWN": "2",
        "HORDE_COLLECTIVE_TIMEOUT": str(COLLECTIVE_TIMEOUT)})
    workers = Workers()
    try:
        for i in range(np):
            workers.start(python(WORKER), env, tmp_path / f"worker{i}.log", node_id=f"n{i}")
        codes = workers.wait(LIMIT)
    finally:
        workers.kill_all()
    assert codes == [0] * np, f"exit codes {codes}\n{workers.all_output()}"
    records = [json.loads((tmp_path / f"reinit-{r}.json").read_text()) for r in range(np)]
    assert [r["rank"] for r in records] == list(range(np))
    for r in records:
        assert len(r["cycles"]) == CYCLES
        # each worker checked its values itself; every rank must also agree on them
        assert r["params"] == records[0]["params"], "parameters differ across ranks"
        assert r["stale_params"] == records[0]["stale_params"], "staleness: ranks differ"
        # rounds ran in every cycle: each cycle's 2 contributions went into an aggregate
        assert r["stale_stats"]["accepted"] >= 2 * CYCLES * np, r["stale_stats"]
    for cycle in range(CYCLES):
        values = [r["cycles"][cycle] for r in records]
        for key in ("allreduce", "average", "async_max", "grouped", "allgather", "broadcast",
                    "objects"):
            assert all(v[key] == values[0][key] for v in values), (cycle, key)
        assert [v["process_set"]["included"] for v in values] == [True, True, False]
    # the peers of a rank that shut down inside their collective failed at once
    for r in (records[0], records[2]):
        assert r["abandoned"]["seconds"] < COLLECTIVE_TIMEOUT / 2, r["abandoned"]
    # no shutdown() ended the job, and no re-init cost a reset: still generation 0
    backend = backend_from_url(etcd_server.url)
    control, _ = read_control(backend, JobKeys(DEFAULT_PREFIX, job))
    assert control.status is not None and control.status.state != "failed", control
    assert control.generation is not None and control.generation.id == 0, control.generation
    inits = sorted(s for r in records for s in r["init_seconds"])
    print(f"re-init: median {inits[len(inits) // 2]:.3f} s, max {inits[-1]:.3f} s")


ALONE = """
import torch
import elastic.torch as hvd
for cycle in range(20):
    hvd.init()
    assert (hvd.rank(), hvd.size()) == (0, 1)
    assert hvd.allreduce(torch.tensor([float(cycle)])).item() == cycle
    ps = hvd.add_process_set([0])
    assert hvd.allgather(torch.ones(1), process_set=ps).tolist() == [1.0]
    hvd.shutdown()
    assert not hvd.is_initialized() and ps.process_set_id is None
print("ok")
"""


def test_a_world_of_one_reinitialises_too() -> None:
    """Without horderun (no rendezvous) `init()` forms a world of one, again each time."""
    env = {k: v for k, v in repo_env().items() if not k.startswith("HORDE_")}
    result = subprocess.run([sys.executable, "-c", ALONE], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
