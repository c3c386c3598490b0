"""The status page in real headless Chromium: tables, leaderboard and chart are there and
update in place (no reload) after new reports; the operator evicts a node from it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from coordinator.server import EmbeddedCoordinator
from rendezvous.generation import BlacklistEntry, Generation, Member, NodeInfo
from rendezvous.keys import JobKeys
from rendezvous.memory import MemoryBackend
from tests.coordinator.helpers import ADMIN_TOKEN, JOB, auth, make_config, report

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic", "--disable-dev-shm-usage"]
UPDATE_TIMEOUT_MS = 15_000
MEMBERS = ["alpha", "beta", "gamma"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium binary (install Debian's 'chromium' package)")
    raise AssertionError("unreachable")


@pytest.fixture
def page_env(tmp_path: Path) -> Iterator[tuple]:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    backend = MemoryBackend()
    keys = JobKeys("horde", JOB)
    for node in MEMBERS:
        backend.put(keys.node(node), NodeInfo(node_id=node, host=node, addr="127.0.0.1",
                                              store_port=1, hardware={"gpu": "RTX"}).to_json())
    generation = Generation(id=1, members=tuple(Member(n, n, "127.0.0.1") for n in MEMBERS),
                            store_host="127.0.0.1", store_port=1)
    backend.put(keys.generation, generation.to_json())
    config = make_config(tmp_path, job=JOB, page_refresh_seconds=0.3)
    profile = tempfile.mkdtemp(prefix="horde-chromium-")
    with EmbeddedCoordinator(config, backend=backend) as coord, \
            sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield coord, context, backend, keys
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def _post_round(url: str, tokens: dict[str, str], rnd: int, samples: dict[str, int]) -> None:
    for node in MEMBERS:
        body = {"node_id": node, "reports": [report(rnd, MEMBERS, samples,
                                                    loss=2.0 / (rnd + 1))]}
        response = requests.post(url + "/api/v1/reports", json=body, headers=auth(tokens[node]),
                                 timeout=10)
        assert response.status_code == 200, response.text


def _cell(page, table: str, node: str, column: str) -> str:
    return page.inner_text(f"#{table} tr[data-node='{node}'] td.{column}").strip()


@pytest.mark.timeout(90)
def test_status_page_updates_without_reload(page_env):
    coord, context, backend, keys = page_env
    url = coord.url
    tokens = {}
    for node in MEMBERS:
        response = requests.post(url + "/api/v1/nodes", json={
            "node_id": node, "display_name": f"<b>{node}</b>"}, timeout=10)
        tokens[node] = response.json()["token"]
    samples = {"alpha": 30, "beta": 20, "gamma": 10}
    _post_round(url, tokens, 0, samples)

    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(url + "/")
    # Server-rendered content is there before any script runs.
    assert page.locator("#nodes tbody tr").count() == 3
    assert _cell(page, "leaderboard", "alpha", "credit") == "30"
    assert page.inner_text("#job-generation") == "1"
    # The page says what a credit unit is (docs/coordinator.md's definition).
    unit = " ".join(page.inner_text("#credit-unit").split())
    assert "One credit is one training sample whose gradient entered an aggregate" in unit
    assert "attested by other members of its round (a quorum of 2" in unit
    # Display names are text, never markup.
    assert page.locator("#nodes b").count() == 0
    page.wait_for_function("window.hordeStatus && window.hordeStatus.updates >= 1",
                           timeout=UPDATE_TIMEOUT_MS)
    assert page.get_attribute("#loss-chart", "data-points") == "1"
    page.evaluate("window.__sameDocument = true")

    for rnd in range(1, 4):
        _post_round(url, tokens, rnd, samples)
    page.wait_for_function(
        "document.querySelector(\"#leaderboard tr[data-node='alpha'] td.credit\")"
        ".textContent.trim() === '120'", timeout=UPDATE_TIMEOUT_MS)
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    assert _cell(page, "nodes", "gamma", "credit") == "40"
    assert page.inner_text("#job-rounds") == "4"
    page.wait_for_function(
        "document.getElementById('loss-chart').getAttribute('data-points') === '4'",
        timeout=UPDATE_TIMEOUT_MS)
    assert page.locator("#loss-chart path.line").count() == 1
    assert page.locator("#nodes tbody tr .state-alive").count() == 3
    assert page.locator("#nodes b").count() == 0
    page.screenshot(path=str(Path(coord.state.config.db_url[len("sqlite:///"):]).parent
                             / "status.png"))

    # The operator evicts gamma from the page (token and reason through prompts).
    answers = iter([ADMIN_TOKEN, "caught cheating"])
    page.on("dialog", lambda dialog: dialog.accept(next(answers)))
    page.click("#nodes button[data-evict='gamma']")
    page.wait_for_function(
        "document.getElementById('evict-message').textContent.includes('evicted')",
        timeout=UPDATE_TIMEOUT_MS)
    entry = BlacklistEntry.from_json(backend.get(keys.blacklisted("gamma")).value)
    assert entry.reason == "caught cheating"
    page.wait_for_function(
        "document.querySelector(\"#nodes tr[data-node='gamma'] .state\")"
        ".textContent === 'evicted'", timeout=UPDATE_TIMEOUT_MS)
    assert page.evaluate("window.__sameDocument") is True
    assert not errors, errors
