"""Horde's coordinator: a durable credit ledger per node, a REST API and a status page.

    from coordinator import CoordinatorConfig, create_app
    app = create_app(CoordinatorConfig(db_url="sqlite:///ledger.db", admin_token="..."))

`coordinator.server.EmbeddedCoordinator` runs one on a background thread (what
`horderun` embeds); `horde-coordinator serve` runs one under waitress. The report
contract for workers is in `coordinator.contract`; docs/coordinator.md explains it.
"""

from __future__ import annotations

from coordinator.app import create_app
from coordinator.config import CoordinatorConfig

__all__ = ["CoordinatorConfig", "create_app"]
