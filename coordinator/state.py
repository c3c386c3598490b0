"""What one coordinator app holds: config, storage, ledger, membership view, metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flask import current_app

from coordinator.config import CoordinatorConfig
from coordinator.contract import RoundReport
from coordinator.membership import (
    MembershipSnapshot,
    RendezvousView,
    RendezvousWatcher,
)
from coordinator.metrics import Metrics
from coordinator.storage import Storage
from coordinator.storage.ledger import Ledger, add_event, note_generation
from rendezvous.etcd_auth import EtcdAuthAdmin

logger = logging.getLogger(__name__)

EXTENSION = "horde_coordinator"
LEARN_MAX_AGE = 0.25  # seconds a rendezvous read serves reports of unknown generations


@dataclass
class CoordinatorState:
    config: CoordinatorConfig
    storage: Storage
    ledger: Ledger
    view: RendezvousView | None
    metrics: Metrics
    clock: Callable[[], float]
    watcher: RendezvousWatcher | None = None
    etcd_admin: EtcdAuthAdmin | None = None
    """Issues and revokes per-node etcd users (None: the job runs without etcd auth)."""

    @property
    def default_job(self) -> str | None:
        return self.view.job if self.view is not None else self.config.job

    latest_generation: int = -1
    """The newest generation recorded from the rendezvous."""

    def learn_generations(self, reports: Sequence[RoundReport]) -> None:
        """Read the rendezvous now if `reports` name a generation newer than any recorded:
        a worker may report before the watcher's next poll. The view's cache bounds how
        often reports for made-up generations make us ask etcd."""
        if self.view is None or self.config.trust_reported_membership:
            return
        newest = max((r.generation for r in reports if r.job == self.view.job), default=-1)
        if newest <= self.latest_generation:
            return
        snap = self.view.snapshot(max_age=LEARN_MAX_AGE)
        if snap.ok and snap.generation is not None \
                and snap.generation.id > self.latest_generation:
            self.record_membership(snap)

    def record_membership(self, snap: MembershipSnapshot) -> None:
        """Write a rendezvous snapshot's news into the timeline (idempotent)."""
        now = self.clock()

        def work(conn):  # noqa: ANN001, ANN202 - a Connection
            if snap.generation is not None:
                note_generation(conn, snap.job, snap.generation.id, snap.generation.node_ids,
                                "rendezvous", now)
            for entry in snap.blacklist.values():
                add_event(conn, now, "evicted", job=snap.job, node_id=entry.node_id,
                          detail=entry.reason[:200],
                          dedupe=f"evict:{snap.job}:{entry.node_id}:{entry.count}")
        self.storage.run_write(work)
        if snap.generation is not None and snap.job == (self.view.job if self.view else None):
            self.latest_generation = max(self.latest_generation, snap.generation.id)

    def close(self) -> None:
        """Stop the watcher and release database connections."""
        if self.watcher is not None:
            self.watcher.stop()
        if self.view is not None:
            self.view.backend.close()
        if self.etcd_admin is not None:
            self.etcd_admin.backend.close()
        self.storage.dispose()


def state() -> CoordinatorState:
    return current_app.extensions[EXTENSION]
