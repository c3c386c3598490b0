"""The ledger on a real PostgreSQL server, started by the test (initdb + pg_ctl).

Skipped only when the PostgreSQL server binaries are not installed (Debian's
`postgresql` package provides them; .ci/run installs it).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from coordinator import CoordinatorConfig, create_app
from coordinator.server import EmbeddedCoordinator
from coordinator.state import EXTENSION
from coordinator.storage.models import metadata
from rendezvous.embedded import free_port
from tests.coordinator.helpers import ADMIN_TOKEN, auth, credit_of, post_reports, register, report

PG_START_TIMEOUT = 60


def _pg_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    """Run as the `postgres` user when we are root (the server refuses to run as root)."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bindir = _pg_bindir()
    if bindir is None:
        print("PostgreSQL tests skipped: no initdb/pg_ctl found (install Debian's "
              "'postgresql' package)")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="horde-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("PostgreSQL is installed but there is no 'postgres' user to run it")
        os.chown(root, user.pw_uid, user.pw_gid)
    port = free_port()
    log = root / "server.log"
    started = False
    try:
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                                     "--auth=trust", "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=PG_START_TIMEOUT)
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off")
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-o", options,
                                     "-l", str(log), "-w", "-t", str(PG_START_TIMEOUT),
                                     "start"]),
                       check=True, capture_output=True, timeout=PG_START_TIMEOUT + 10)
        started = True
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    except subprocess.CalledProcessError as exc:
        tail = log.read_text()[-2000:] if log.exists() else ""
        pytest.fail(f"could not start PostgreSQL: {exc.stderr.decode()[-2000:]}\n{tail}")
    finally:
        if started:
            subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m",
                                         "immediate", "-w", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_app(postgres_url: str):
    # A fresh schema for each test: drop whatever the previous one left.
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    config = CoordinatorConfig(db_url=postgres_url, admin_token=ADMIN_TOKEN,
                               watch_rendezvous=False, trust_reported_membership=True)
    app = create_app(config)
    yield app
    app.extensions[EXTENSION].close()


def test_migrations_build_the_schema_the_models_describe(pg_app):
    storage = pg_app.extensions[EXTENSION].storage
    assert storage.dialect == "postgresql"
    assert storage.current_revision() == storage.head_revision()
    assert {"nodes", "reports", "credits", "rounds", "events"} <= set(storage.table_names())
    with storage.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                 metadata)
    assert diffs == []
    storage.upgrade()  # idempotent
    assert storage.current_revision() == storage.head_revision()


def test_credit_flow_on_postgres(pg_app):
    client = pg_app.test_client()
    members = ["a", "b", "c"]
    samples = {"a": 32, "b": 16, "c": 8}
    tokens = {n: register(client, n) for n in members}
    for rnd in range(5):
        for node in members:
            overrides = {"c": {"samples": 800}} if node == "c" else None
            response = post_reports(client, node, tokens[node], [
                report(rnd, members, samples, overrides=overrides, loss=1.0 / (rnd + 1))])
            assert response.status_code == 200
    # Replays count nothing.
    for node in members:
        overrides = {"c": {"samples": 800}} if node == "c" else None
        body = post_reports(client, node, tokens[node], [
            report(0, members, samples, overrides=overrides)])
        assert body.get_json()["duplicate"] == 1
    assert {n: credit_of(client, n) for n in members} == {"a": 160, "b": 80, "c": 40}
    assert client.get("/api/v1/nodes/c").get_json()["disputes"] == 5
    status = client.get("/api/v1/status").get_json()
    assert status["job"]["rounds"] == 5 and len(status["loss"]) == 5
    assert client.get("/").status_code == 200


@pytest.mark.timeout(120)
def test_concurrent_batches_on_postgres(postgres_url, pg_app):
    """Many writers at once on a real server: row locks keep the ledger exact."""
    pg_app.extensions[EXTENSION].close()
    config = CoordinatorConfig(db_url=postgres_url, admin_token=ADMIN_TOKEN,
                               watch_rendezvous=False, trust_reported_membership=True)
    members = [f"p{i}" for i in range(4)]
    rounds = 120
    with EmbeddedCoordinator(config, threads=8) as coord:
        tokens = {}
        for node in members:
            response = requests.post(coord.url + "/api/v1/nodes", json={"node_id": node},
                                     timeout=10)
            tokens[node] = response.json()["token"]
        errors: list[str] = []

        def work(node: str) -> None:
            session = requests.Session()
            for start in range(0, rounds, 6):
                body = {"node_id": node, "reports": [
                    report(r, members, {m: 10 + i for i, m in enumerate(members)})
                    for r in range(start, start + 6)]}
                # Each batch twice, concurrently with everyone else's.
                for _ in range(2):
                    response = session.post(coord.url + "/api/v1/reports", json=body,
                                            headers=auth(tokens[node]), timeout=30)
                    if response.status_code != 200:
                        errors.append(response.text)

        threads = [threading.Thread(target=work, args=(n,)) for n in members]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not errors, errors[:3]
        credit = {n: requests.get(f"{coord.url}/api/v1/nodes/{n}", timeout=10).json()["credit"]
                  for n in members}
    assert credit == {m: rounds * (10 + i) for i, m in enumerate(members)}
