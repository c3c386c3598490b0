"""Sends round reports (`elastic.credit.reports`) to the coordinator, off the training path.

Every member reports what it saw in each round's collective (every member's samples,
staleness, parameter version, accepted or why not); the coordinator credits a node only
when other members' reports agree. Synchronous steps are coalesced into reports of a
*span* of consecutive steps (`StepWindow`): a report per step cost the coordinator more
CPU than a small model's training step. Reports are queued in memory and posted in batches by
a background thread, retried with backoff while the coordinator is away; a training step
never waits for the coordinator.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import threading
import time
from collections import deque
from typing import Any

import requests

from elastic.coordinator_client import CoordinatorClient
from elastic.credit.reports import StepWindow
from elastic.settings import DEFAULT_REPORT_SPAN

logger = logging.getLogger(__name__)

BATCH = 50
FLUSH_EVERY = 1.0
MAX_QUEUED = 100_000
BACKOFF_START = 0.5
BACKOFF_MAX = 60.0
#: seconds before each resend of a report the coordinator could not settle yet (it had
#: not read the report's generation from the rendezvous); after the last, it is dropped
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


class CreditReporter:
    """Registers this node with the coordinator and posts round reports in the background."""

    def __init__(self, url: str | list[str], node_id: str, job: str,
                 registration_token: str | None = None, token: str | None = None,
                 hardware: dict[str, Any] | None = None, span: int = DEFAULT_REPORT_SPAN) -> None:
        # One coordinator URL, or several sharing one ledger (failed over in order).
        self._client = CoordinatorClient(url)
        self.node_id = node_id
        self.job = job
        self._registration_token = registration_token
        self._token = token
        self._own_token = ""
        self._hardware = hardware or {}
        self._queue: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUED)
        self._wake = threading.Condition()
        self._stop = False
        self._stopped = threading.Event()
        self._flush_deadline = float("inf")
        self._disabled = False
        self.sent = 0
        self.loss: float | None = None
        self._steps = StepWindow(span)
        self._retry: list[tuple[float, dict[str, Any]]] = []  # (due, report), under _wake
        self._attempts: dict[int, tuple[int, dict[str, Any]]] = {}  # id(report) -> resends
        self.given_up = 0
        self._thread = threading.Thread(target=self._run, name="horde-reporter", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The coordinator in use."""
        return self._client.url

    # -- the training side ------------------------------------------------------------

    def record(self, report: dict[str, Any]) -> None:
        """Queue one round report (never blocks; the oldest go first when the queue is full)."""
        if self._disabled:
            return
        if self.loss is not None:
            report["loss"] = self.loss
        with self._wake:
            self._queue.append(report)
            if len(self._queue) >= BATCH:
                self._wake.notify()

    def record_step(self, generation: int, members: list[str], counts: list[int]) -> None:
        """Record one synchronous step (every member's samples); reported in spans."""
        for report in self._steps.add(self.job, generation, members, counts):
            self.record(report)

    def flush(self) -> None:
        """Report the steps not yet reported (at `hvd.shutdown()`: the node may stay idle
        for long); step numbers go on where they were, so a re-init reports no step twice."""
        for report in self._steps.flush():
            self.record(report)

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued, retrying for up to `timeout` seconds, then stop."""
        self.flush()
        with self._wake:
            self._stop = True
            self._flush_deadline = time.monotonic() + timeout
            self._wake.notify()
        self._stopped.set()
        self._thread.join(timeout + 1.0)

    # -- the background thread --------------------------------------------------------

    def _register(self) -> bool:
        if self._token:
            return True
        headers = ({"Authorization": f"Bearer {self._registration_token}"}
                   if self._registration_token else {})
        # Our own token: a registration retried on another coordinator after a lost
        # answer then succeeds again instead of finding the id taken.
        self._own_token = self._own_token or "hrd_" + secrets.token_urlsafe(32)
        body = {"node_id": self.node_id, "display_name": self.node_id,
                "hardware": self._hardware, "token": self._own_token}
        response = self._client.post("/api/v1/nodes", json=body, headers=headers, timeout=10)
        if response.status_code == 422 and "token" in response.text:
            # A coordinator older than own tokens: let it issue one.
            del body["token"]
            response = self._client.post("/api/v1/nodes", json=body, headers=headers,
                                         timeout=10)
        if response.status_code == 201:
            self._token = response.json().get("token") or self._own_token
            logger.info("registered %s with the coordinator at %s", self.node_id, self.url)
            return True
        if response.status_code >= 500 or response.status_code == 429:
            raise requests.ConnectionError(f"coordinator answered {response.status_code}")
        logger.warning("the coordinator refused to register %s (%d: %s); not reporting credit",
                       self.node_id, response.status_code, response.text[:200])
        self._disabled = True
        return False

    def _take(self) -> list[dict[str, Any]]:
        with self._wake:
            if not self._queue and not self._stop:
                self._wake.wait(FLUSH_EVERY)
            if self._retry:
                now = time.monotonic()
                self._queue.extend(report for due, report in self._retry if due <= now)
                self._retry = [(due, report) for due, report in self._retry if due > now]
            return [self._queue[i] for i in range(min(BATCH, len(self._queue)))]

    def _resend_later(self, batch: list[dict[str, Any]], answer: Any) -> None:
        """Queue again, after a delay, the reports rejected for a reason that can change
        (`retry`: the coordinator has not read their generation from the rendezvous yet)."""
        results = answer.get("results", []) if isinstance(answer, dict) else []
        now = time.monotonic()
        again: set[int] = set()
        for item in results if isinstance(results, list) else []:
            if not isinstance(item, dict):
                continue
            index = item.get("index")
            if not (item.get("status") == "rejected" and item.get("retry") is True
                    and type(index) is int and 0 <= index < len(batch)):
                continue
            report = batch[index]
            attempts = self._attempts.get(id(report), (0, report))[0] + 1
            if attempts > len(RETRY_DELAYS):
                self.given_up += 1
                logger.warning("the coordinator could not settle the report of round %s of "
                               "generation %s after %d tries (%s); dropping it",
                               report.get("round"), report.get("generation"), attempts,
                               str(item.get("message", ""))[:200])
                continue
            self._attempts[id(report)] = (attempts, report)
            with self._wake:
                self._retry.append((now + RETRY_DELAYS[attempts - 1], report))
            again.add(id(report))
        for report in batch:
            if id(report) not in again:
                self._attempts.pop(id(report), None)

    def _post(self, batch: list[dict[str, Any]]) -> bool:
        """True when the batch is handled (sent, or refused for good)."""
        body = json.dumps({"node_id": self.node_id, "reports": batch}, allow_nan=False)
        response = self._client.post(
            "/api/v1/reports", data=body, timeout=10,
            headers={"Authorization": f"Bearer {self._token}",
                     "Content-Type": "application/json"})
        if response.status_code in (401, 403):
            logger.warning("the coordinator refused this node's token (%d); not reporting",
                           response.status_code)
            self._disabled = True
            return True
        if response.status_code >= 500 or response.status_code == 429:
            raise requests.ConnectionError(f"coordinator answered {response.status_code}")
        if response.status_code >= 400:
            logger.warning("the coordinator rejected a batch of %d reports (%d: %s)",
                           len(batch), response.status_code, response.text[:300])
            return True
        try:
            answer = response.json()
        except ValueError:
            answer = None
        self._resend_later(batch, answer)
        return True

    def _run(self) -> None:
        delay = BACKOFF_START
        while not self._disabled:
            batch = self._take()
            if not batch:
                if self._stop:
                    if self._retry and time.monotonic() < self._flush_deadline:
                        time.sleep(0.2)  # resends still due before the exit deadline
                        continue
                    return
                continue
            try:
                if self._register() and not self._disabled and self._post(batch):
                    with self._wake:
                        for _ in batch:
                            if self._queue:
                                self._queue.popleft()
                    self.sent += len(batch)
                delay = BACKOFF_START
            except (requests.RequestException, ValueError) as exc:
                if self._stop:
                    if time.monotonic() >= self._flush_deadline:
                        logger.warning("coordinator unreachable at exit; %d reports not sent",
                                       len(self._queue))
                        return
                    time.sleep(0.2)
                    continue
                logger.info("coordinator unreachable (%s); retrying in %.1f s", exc, delay)
                self._stopped.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, BACKOFF_MAX)
