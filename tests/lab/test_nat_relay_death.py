"""A relay dies and the job goes on: the owner's worker in the public namespace is the
only member that listens, so it relays the parts between the two volunteers behind NAT.
It is SIGKILLed mid-training; the two volunteers roll back, go on as two (through the
owner's relay hub, since neither listens), finish with identical parameters and keep
earning credit, and the job (every `horderun`, the owner's included) exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import repo_env
from tests.lab.netns import NatLab
from tests.lab.test_nat_relay import start_owner
from tests.lab.test_public_join import _credit, _records, _wait

REPO = Path(__file__).resolve().parents[2]
HOMES = ("home1", "home2")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]

#: prints the job's generation record, read from the owner's etcd inside the public side
READ_GENERATION = """
import sys
from rendezvous import backend_from_url
from rendezvous.keys import JobKeys
from rendezvous.settings import RendezvousSettings
backend = backend_from_url(sys.argv[1])
kv = backend.get(JobKeys(RendezvousSettings().prefix, sys.argv[2]).generation)
print(kv.value.decode() if kv else "")
"""


def _commits(folder: Path, size: int) -> list[dict]:
    return [r for r in _records(folder) if r["event"] == "commit" and r["size"] == size]


def _generation(lab: NatLab, argv: list[str], owner_log: Path) -> dict:
    """The job's generation, read as the owner (root of its etcd, which has auth and TLS
    on: the defaults when it serves beyond loopback)."""
    url, job = argv[argv.index("--rendezvous") + 1], argv[argv.index("--job") + 1]
    found = re.search(r"root password in (\S+)\)", owner_log.read_text(errors="replace"))
    assert found, "the owner's horderun did not say where its etcd root password is"
    ca = re.search(r"TLS with the CA in (\S+) ", owner_log.read_text(errors="replace"))
    assert ca, "the owner's etcd serves beyond loopback: it should speak TLS (the default)"
    out = subprocess.run(["ip", "netns", "exec", lab.ns_pub, sys.executable, "-c",
                          READ_GENERATION, url, job], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env=repo_env(
                             HORDE_ETCD_USER="root", HORDE_ETCD_PASSWORD_FILE=found.group(1),
                             HORDE_ETCD_CACERT=ca.group(1)))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_member_that_relays_dies_and_the_members_behind_nat_go_on(
        lab: NatLab, tmp_path: Path) -> None:
    outs, logs, stop, db, common, owner, all_logs, argv = start_owner(lab, tmp_path, HOMES)
    _wait("the owner's worker to train", lambda: _records(outs["owner"]), 60, all_logs)
    joiners = {name: lab.popen(lab.homes[i], argv, repo_env(
        HORDE_TEST_OUT=str(outs[name]), HORDE_HOSTNAME=name, **common), logs[name], cwd=REPO)
        for i, name in enumerate(HOMES)}
    _wait("three members committing, two of them behind NAT", lambda: all(
        len(_commits(outs[n], 3)) >= 4 for n in outs), 150, all_logs)

    # The generation of three goes through the relay, and its only member that listens
    # (so the one that relays the homes' parts to each other) is the owner's worker.
    generation = _generation(lab, argv, logs["owner"])
    assert generation["relay"], generation
    listening = [m["node_id"] for m in generation["members"] if m["reachable"]]
    owner_node = _records(outs["owner"])[0]["node"]
    assert listening == [owner_node], generation
    home_nodes = {n: _records(outs[n])[0]["node"] for n in HOMES}

    credit_before = _credit(db)
    relay = _commits(outs["owner"], 3)[-1]
    os.kill(relay["pid"], signal.SIGKILL)
    killed_at = time.time()

    # The homes roll back and go on as two, with nobody left to listen: through the hub.
    _wait("the members behind NAT committing as two", lambda: all(
        len(_commits(outs[n], 2)) >= 6 for n in HOMES), 120, all_logs)
    after = _generation(lab, argv, logs["owner"])
    assert sorted(m["node_id"] for m in after["members"]) == sorted(home_nodes.values())
    assert after["relay"] and not any(m["reachable"] for m in after["members"]), after
    by_step: dict[tuple, set[str]] = {}
    for name in HOMES:
        for r in _commits(outs[name], 2):
            by_step.setdefault((r["generation"], r["epoch"], r["batch"]), set()).add(r["params"])
    assert by_step and all(len(p) == 1 for p in by_step.values()), by_step
    assert all(r["time"] > killed_at for n in HOMES for r in _commits(outs[n], 2))

    stop.touch()
    for name, proc in (*joiners.items(), ("owner", owner)):
        _wait(f"{name} to exit", lambda proc=proc: proc.poll() is not None, 120, all_logs)
    codes = {name: proc.returncode for name, proc in (*joiners.items(), ("owner", owner))}
    assert codes == {"home1": 0, "home2": 0, "owner": 0}, "\n".join(
        f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}" for log in all_logs)

    done = {n: [r for r in _records(outs[n]) if r["event"] == "done"] for n in HOMES}
    assert all(len(d) == 1 for d in done.values()), done
    assert done["home1"][0]["params"] == done["home2"][0]["params"]
    assert done["home1"][0]["size"] == done["home2"][0]["size"] == 2

    # The homes' credit in the owner's ledger grew after the relay died.
    credit_after = _credit(db)
    for name, node in home_nodes.items():
        assert credit_after.get(node, 0) > credit_before.get(node, 0), (
            f"{name} ({node}) earned no credit after the relay died: before "
            f"{credit_before}, after {credit_after}")
