"""Peer bytes are data, never code: a hostile member's pickle runs nothing on the others.

Real worker processes against a real etcd; one rank plays a member whose client was
modified to put a pickle with a `__reduce__` (it writes a marker file) on the wire, in
broadcast_object, allgather_object and the elastic state sync. The honest ranks must
refuse it with an error that names what was refused and the opt-in, and the marker must
not exist anywhere. Common objects travel intact; `horderun --trusted-peers` lets code
travel for a cluster whose members are all trusted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Workers, horderun, python, repo_env, unique_job, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SCRIPT = Path(__file__).resolve().parent / "scripts" / "object_worker.py"
NP = 3


def run_mode(etcd_url: str, out: Path, mode: str, wait_for: list[int], limit: float = 90
             ) -> tuple[dict[int, dict[str, Any]], str]:
    """Start NP workers; return the results of ranks `wait_for` once each has finished."""
    env = worker_env(etcd_url, unique_job(f"sec-{mode}"), NP,
                     extra={"OUT": str(out), "HORDE_TEST_MODE": mode})
    workers = Workers()
    deadline = time.monotonic() + limit
    try:
        for i in range(NP):
            workers.start(python(SCRIPT), env, out / f"worker{i}.log")
        while time.monotonic() < deadline:
            done = [p.poll() is not None for p in workers.procs]
            if all(done) or all((out / f"rank{r}.json").exists() and _final(out, r, mode)
                                for r in wait_for):
                break
            time.sleep(0.2)
    finally:
        workers.kill_all()
    output = workers.all_output()
    results = {}
    for rank in wait_for:
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no results\n{output}"
        results[rank] = json.loads(path.read_text())
    return results, output


def _final(out: Path, rank: int, mode: str) -> bool:
    if mode != "attack":
        return True
    try:
        return "state_sync" in json.loads((out / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return False


def refused(result: dict[str, Any], what: str) -> str:
    assert result["raised"] == "ObjectNotAllowedError", f"{what}: {result}"
    assert "--trusted-peers" in result["message"], result["message"]
    return result["message"]


def test_hostile_pickles_run_nothing_on_honest_members(etcd_server: Any, tmp_path: Path
                                                       ) -> None:
    results, output = run_mode(etcd_server.url, tmp_path, "attack", wait_for=[0, 1, 2])
    markers = sorted(p.name for p in tmp_path.glob("marker-*"))
    assert markers == [], f"hostile code ran: {markers}\n{output}"
    attacker = NP - 1
    for rank in range(NP - 1):  # honest receivers of the hostile broadcasts
        got = results[rank]
        assert "exec" in refused(got["broadcast_exec"], "broadcast with exec")
        assert "posix.system" in refused(got["broadcast_system"], "broadcast with os.system")
        assert "full pickle" in refused(got["broadcast_full_pickle"], "full pickle")
        old = got["broadcast_old_format"]  # untagged cloudpickle, as older Horde sent
        assert old["raised"] == "ObjectNotAllowedError" and "unknown format" in old["message"]
        assert f"rank {attacker}" in refused(got["allgather"], "allgather")
        assert got["after"] == NP, got
    for rank in range(1, NP):  # honest members of the state sync, whose root is rank 0
        assert "rank 0" in refused(results[rank]["state_sync"], "elastic state sync")


def test_a_huge_announced_object_is_refused_before_anything_is_allocated(
        etcd_server: Any, tmp_path: Path) -> None:
    # The attacker announces 2^40 bytes in broadcast_object's and allgather_object's size
    # exchange (the elastic state sync is a broadcast_object). Before the cap, the honest
    # ranks tried to allocate it (torch.empty(2^40)) or waited for bytes never sent.
    results, output = run_mode(etcd_server.url, tmp_path, "huge", wait_for=[0, 1])
    attacker = NP - 1
    for rank in range(NP - 1):
        got = results[rank]
        for what in ("broadcast", "allgather"):
            assert got[what]["raised"] == "ObjectTooLargeError", (what, got[what], output)
            message = got[what]["message"]
            assert f"rank {attacker}: {2 ** 40} bytes" in message, message
            assert "HORDE_MAX_OBJECT_BYTES=1073741824" in message, message
        assert got["after"] == NP, got
        assert got["max_rss_bytes"] < 2 ** 31, got["max_rss_bytes"]


def test_common_objects_round_trip_between_untrusted_peers(etcd_server: Any, tmp_path: Path
                                                           ) -> None:
    results, output = run_mode(etcd_server.url, tmp_path, "common", wait_for=list(range(NP)))
    first = results[0]
    for rank in range(NP):
        got = results[rank]
        assert got["got"] == first["got"], f"rank {rank} got another object\n{output}"
        assert got["gathered_ranks"] == list(range(NP))
        assert got["gathered_arrays"] == [list(map(float, range(r + 3))) for r in range(NP)]
        assert got["adam"] == first["adam"] and got["adam_state"] == first["adam_state"]
        assert (got["epoch"], got["batch"]) == (0, 0), got  # rank 0's values, after sync
    assert "'max_lr': 0.1" in first["got"]["adam"], first["got"]["adam"]
    assert "'total_steps': 10" in first["got"]["scheduler"], first["got"]["scheduler"]
    assert "Traceback" not in output, output


def test_trusted_peers_opt_in_lets_code_travel(tmp_path: Path) -> None:
    env = repo_env(OUT=str(tmp_path), HORDE_TEST_MODE="trusted")
    done = horderun("-np", "2", "--trusted-peers", "--log-level", "WARNING",
                    "--coordinator", "none", str(python(SCRIPT)[0]), str(SCRIPT), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"fn": 41, "local": [0, 1]}, result
    # without the flag, the same script is refused on every rank with the opt-in named
    env["HORDE_TRUSTED_PEERS"] = "0"
    plain = horderun("-np", "2", "--log-level", "WARNING", "--coordinator", "none",
                     str(python(SCRIPT)[0]), str(SCRIPT), env=env)
    assert plain.returncode != 0
    assert "ObjectNotAllowedError" in plain.stdout + plain.stderr
    assert "--trusted-peers" in plain.stdout + plain.stderr
