"""A job served to another machine: the owner's `horderun` in namespace A names the
address to serve on; a volunteer in namespace B pastes the join command the owner
printed, joins, trains to the end with identical parameters and earns credit."""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.harness import repo_env
from tests.lab.netns import LabUnavailable, VethLab

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "tests" / "elastic" / "scripts" / "elastic_worker.py")
JOIN_PREFIX = "add workers with: "
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def lab() -> Iterator[VethLab]:
    try:
        with VethLab() as created:
            yield created
    except LabUnavailable as exc:
        pytest.skip(str(exc))


def _wait(what: str, check: Callable[[], object], timeout: float, logs: list[Path]) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    dump = "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}"
                     for log in logs if log.exists())
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{dump}")


def _records(folder: Path) -> list[dict]:
    lines = []
    for path in folder.glob("*.jsonl"):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


def _join_line(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if JOIN_PREFIX in line:
            return line.split(JOIN_PREFIX, 1)[1]
    return None


def _credit(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT node_id, SUM(credit) FROM credits GROUP BY node_id")
        return {node: int(total) for node, total in rows}


@pytest.mark.parametrize("serve_flag", ["--network-interfaces", "--listen"])
def test_volunteer_in_another_namespace_joins_with_the_printed_command(
        lab: VethLab, tmp_path: Path, serve_flag: str) -> None:
    out_a, out_b = tmp_path / "owner", tmp_path / "volunteer"
    out_a.mkdir()
    out_b.mkdir()
    stop, db = tmp_path / "stop", tmp_path / "ledger.sqlite"
    owner_log, joiner_log = tmp_path / "owner.log", tmp_path / "joiner.log"
    serve_on = lab.iface_a if serve_flag == "--network-interfaces" else lab.addr_a
    common = {"TEST_EPOCHS": "1000", "TEST_STOP_FILE": str(stop), "TEST_STEP_DELAY": "0.05",
              # `horderun` of the printed command resolves to this venv's console script
              "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    owner = lab.popen(lab.ns_a, [
        sys.executable, "-m", "elastic.launcher.cli", "-np", "1", "--min-np", "1",
        "--max-np", "2", serve_flag, serve_on, "--coordinator-db", f"sqlite:///{db}",
        "--lease-ttl", "2", "--settle-window", "0.3", "--start-timeout", "30",
        sys.executable, SCRIPT], repo_env(HORDE_TEST_OUT=str(out_a), **common), owner_log,
        cwd=REPO)
    logs = [owner_log, joiner_log]

    printed = str(_wait("the owner's join command", lambda: _join_line(owner_log), 60, logs))
    argv = shlex.split(printed)
    assert argv[:2] == ["horderun", "--join"], printed
    rendezvous = urlsplit(argv[argv.index("--rendezvous") + 1])
    # Serving beyond loopback, etcd speaks TLS by default; the command pins its CA.
    assert (rendezvous.scheme, rendezvous.hostname) == ("https", lab.addr_a), printed
    assert "--etcd-ca-sha256" in argv and "--etcd-cacert" not in argv, printed
    assert "127.0.0.1" not in printed
    assert "--coordinator" in argv, printed
    coordinator = urlsplit(argv[argv.index("--coordinator") + 1])
    assert (coordinator.scheme, coordinator.hostname) == ("http", lab.addr_a), printed
    owner_text = owner_log.read_text(errors="replace")
    # The embedded etcd serves the public address with authentication on (the default).
    assert "embedded etcd authentication on" in owner_text
    assert "WITHOUT AUTHENTICATION" not in owner_text and "plain HTTP" not in owner_text
    _wait("the owner's worker to train", lambda: any(
        r["event"] == "commit" for r in _records(out_a)), 60, logs)

    joiner_data = tmp_path / "joiner-data"
    joiner = lab.popen(lab.ns_b, argv, repo_env(HORDE_TEST_OUT=str(out_b),
                                                HORDE_DATA_DIR=str(joiner_data), **common),
                       joiner_log, cwd=REPO)
    _wait("the joiner's etcd password file", lambda: list(joiner_data.glob("etcd/*.password")),
          60, logs)
    _wait("both workers committing in a world of two", lambda: sum(
        r["event"] == "commit" and r["size"] == 2 for r in _records(out_b)) >= 4, 90, logs)
    stop.touch()
    for proc, log in ((joiner, joiner_log), (owner, owner_log)):
        _wait(f"{log.stem} to exit", lambda proc=proc: proc.poll() is not None, 90, logs)
    assert (owner.returncode, joiner.returncode) == (0, 0), "\n".join(
        log.read_text(errors="replace")[-4000:] for log in logs)

    owner_done = [r for r in _records(out_a) if r["event"] == "done"]
    joiner_done = [r for r in _records(out_b) if r["event"] == "done"]
    assert len(owner_done) == 1 and len(joiner_done) == 1
    assert owner_done[0]["params"] == joiner_done[0]["params"]
    assert owner_done[0]["size"] == joiner_done[0]["size"] == 2
    # At every commit of the two-member generations both held the same parameters.
    by_step: dict[tuple, set[str]] = {}
    for r in _records(out_a) + _records(out_b):
        if r["event"] == "commit" and r["size"] == 2:
            by_step.setdefault((r["generation"], r["epoch"], r["batch"]), set()).add(r["params"])
    assert by_step and all(len(params) == 1 for params in by_step.values()), by_step

    joiner_node = joiner_done[0]["node"]
    # The printed command needed nothing more: the joiner got its own etcd user from the
    # owner's coordinator (a node user: it cannot lead, write the generation or evict).
    assert f"node {joiner_node} joins as etcd user" in joiner_log.read_text(errors="replace")
    assert "etcd's CA from the job's coordinator matches" in joiner_log.read_text(
        errors="replace")
    # Its password file lived as long as its worker, no longer.
    assert not list(joiner_data.glob("etcd/*.password"))
    credit = _credit(db)
    assert credit.get(joiner_node, 0) > 0, f"no credit for {joiner_node}: {credit}"
    assert credit.get(owner_done[0]["node"], 0) > 0, credit


def test_serving_on_another_machines_address_is_refused(lab: VethLab) -> None:
    # From B, A's address is reachable but not B's own: nothing in B could serve there.
    # An interface without an address: a veth pair inside B (needs no `dummy` module).
    dummy = lab.iface_b[:-1] + "d"
    subprocess.run(["ip", "-n", lab.ns_b, "link", "add", dummy, "type", "veth", "peer",
                    "name", dummy + "p"], check=True, timeout=30)  # deleted with B
    cases = [(["--listen", lab.addr_a], f"--listen {lab.addr_a}: not an address of this machine"),
             (["--listen", dummy], f"--listen {dummy!r}: the interface has no IPv4 address"),
             (["--network-interfaces", dummy], f"no IPv4 address found on {dummy}")]
    for flags, message in cases:
        result = subprocess.run(
            ["ip", "netns", "exec", lab.ns_b, sys.executable, "-m", "elastic.launcher.cli",
             *flags, "-np", "1", sys.executable, SCRIPT],
            env=repo_env(), capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        # the interfaces B has, with their addresses, and none of A's
        assert f"{lab.iface_b} {lab.addr_b}" in result.stderr and "lo 127.0.0.1" in result.stderr
        assert f"{dummy} (no IPv4)" in result.stderr and lab.iface_a not in result.stderr
