"""What one coordinator app holds: config, storage, ledger, membership view, metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from flask import current_app

from coordinator.config import CoordinatorConfig
from coordinator.membership import (
    MembershipSnapshot,
    RendezvousView,
    RendezvousWatcher,
)
from coordinator.metrics import Metrics
from coordinator.storage import Storage
from coordinator.storage.ledger import Ledger, add_event, note_generation

logger = logging.getLogger(__name__)

EXTENSION = "horde_coordinator"


@dataclass
class CoordinatorState:
    config: CoordinatorConfig
    storage: Storage
    ledger: Ledger
    view: RendezvousView | None
    metrics: Metrics
    clock: Callable[[], float]
    watcher: RendezvousWatcher | None = None

    @property
    def default_job(self) -> str | None:
        return self.view.job if self.view is not None else self.config.job

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

    def close(self) -> None:
        """Stop the watcher and release database connections."""
        if self.watcher is not None:
            self.watcher.stop()
        if self.view is not None:
            self.view.backend.close()
        self.storage.dispose()


def state() -> CoordinatorState:
    return current_app.extensions[EXTENSION]
