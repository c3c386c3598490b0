"""Migrations, configuration, the command line, the embedded server and the metrics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import coordinator
from coordinator import CoordinatorConfig, create_app
from coordinator.cli import main as cli_main
from coordinator.server import EmbeddedCoordinator
from coordinator.state import EXTENSION
from coordinator.storage import Storage, StorageError
from coordinator.storage.models import metadata
from tests.coordinator.helpers import auth, make_config, post_reports, register, report


def test_migrations_match_the_models(tmp_path):
    storage = Storage(f"sqlite:///{tmp_path / 'l.db'}")
    assert storage.current_revision() is None
    storage.upgrade()
    assert storage.current_revision() == storage.head_revision()
    with storage.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []
    storage.upgrade()  # a second upgrade is a no-op
    storage.dispose()


def test_a_ledger_of_the_first_revision_upgrades_and_keeps_its_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    storage = Storage(url)
    storage.upgrade("0001")
    with storage.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO credits (job, generation, round, node_id, credit, samples, staleness, "
            "param_version, accepted, reason, attesters, registered, granted_at) VALUES "
            "('j', 1, 5, 'a', 32, 32, 0, 5, 1, NULL, 2, 0, 1.0)")
    storage.upgrade()
    assert storage.current_revision() == storage.head_revision()
    with storage.engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT credit, span FROM credits").one()
    assert tuple(row) == (32, 1)
    storage.dispose()


def test_schema_comes_from_migrations_only():
    root = Path(coordinator.__file__).parent
    sources = [p.read_text() for p in root.rglob("*.py")]
    assert not any("create_all(" in text for text in sources)


def test_data_survives_a_new_app_on_the_same_file(tmp_path):
    app = create_app(make_config(tmp_path))
    client = app.test_client()
    tokens = {n: register(client, n) for n in ("a", "b")}
    for node in ("a", "b"):
        post_reports(client, node, tokens[node], [report(0, ["a", "b"], {"a": 3, "b": 4})])
    app.extensions[EXTENSION].close()
    again = create_app(make_config(tmp_path)).test_client()
    assert again.get("/api/v1/nodes/a").get_json()["credit"] == 3
    assert post_reports(again, "a", tokens["a"],
                        [report(0, ["a", "b"], {"a": 3, "b": 4})]).get_json()["duplicate"] == 1
    again.application.extensions[EXTENSION].close()


def test_in_memory_sqlite_is_refused(tmp_path):
    with pytest.raises(StorageError, match="must be a file"):
        Storage("sqlite://")
    with pytest.raises(StorageError, match="must be a file"):
        Storage("sqlite:///:memory:")


@pytest.mark.parametrize("kwargs,match", [
    ({"db_url": "ledger.db"}, "SQLAlchemy URL"),
    ({"admin_token": "short"}, "at least 16"),
    ({"half_life_days": 0}, "half_life_days"),
    ({"quorum": 0}, "quorum"),
    ({"max_body_bytes": 10}, "max_body_bytes"),
    ({"job": "a/b"}, "job"),
    ({"sqlite_synchronous": "SOMETIMES"}, "sqlite_synchronous"),
])
def test_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoordinatorConfig(**kwargs)


def test_config_from_env_flags_win():
    env = {"HORDE_COORDINATOR_QUORUM": "3", "HORDE_COORDINATOR_HALF_LIFE_DAYS": "2.5",
           "HORDE_COORDINATOR_JOB": "envjob", "HORDE_COORDINATOR_WATCH_RENDEZVOUS": "no"}
    config = CoordinatorConfig.from_env(env, job="flagjob", admin_token=None)
    assert config.quorum == 3 and config.half_life_days == 2.5
    assert config.job == "flagjob" and config.watch_rendezvous is False


def test_migrate_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert cli_main(["--log-level", "WARNING", "migrate", "--db", url]) == 0
    storage = Storage(url)
    assert storage.current_revision() == storage.head_revision()
    storage.dispose()
    # The installed console script is the same entry point.
    result = subprocess.run([sys.executable, "-m", "coordinator.cli", "migrate", "--db",
                             "not-a-url"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "SQLAlchemy URL" in result.stderr


def test_embedded_coordinator_serves_and_stops(tmp_path):
    coord = EmbeddedCoordinator(make_config(tmp_path))
    try:
        assert requests.get(coord.url + "/api/v1/health", timeout=10).json()["status"] == "ok"
        page = requests.get(coord.url + "/", timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
        assert requests.get(coord.url + "/static/coordinator/status.js", timeout=10).ok
    finally:
        coord.stop()
        coord.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(coord.url + "/api/v1/health", timeout=2)


def test_metrics_describe_the_job(client):
    members = ["a", "b", "c"]
    tokens = {n: register(client, n) for n in members}
    for node in members:
        body = report(0, members, {"a": 5, "b": 6, "c": 7}, refused={"c": "outlier"})
        body["timestamp"] = 1.0  # a round that closed long ago: a large report lag
        post_reports(client, node, tokens[node], [body])
    post_reports(client, "a", tokens["a"], [report(0, members, {"a": 5, "b": 6, "c": 7})])
    client.post("/api/v1/reports", json={"node_id": "a", "reports": []}, headers=auth("x" * 20))
    text = client.get("/metrics").get_data(as_text=True)
    for line in ('horde_world_size{job="job1"} 3.0', 'horde_rounds_total{job="job1"} 1.0',
                 "horde_credits_granted_total 11.0",
                 'horde_rejected_contributions_total{reason="outlier"} 1.0',
                 'horde_reports_total{status="stored"} 3.0',
                 'horde_reports_total{status="conflict"} 1.0',
                 'horde_report_lag_seconds_bucket{le="+Inf"} 3.0',
                 'horde_http_responses_total{code="422"} 1.0',
                 "horde_ledger_credit_total 11.0", "horde_nodes_registered 3.0"):
        assert line in text, line
    assert 'horde_samples_per_second{job="job1"}' in text
