"""`create_app(config)`: the coordinator as a Flask application.

The factory opens the ledger, migrates it to the newest schema (Alembic `upgrade
head`), connects to the rendezvous when one is configured, and registers one blueprint
per resource plus the status page. Serve it with a real WSGI server
(`horde-coordinator serve` uses waitress), never Flask's development server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from flask import Flask, Response

from coordinator.api import register_blueprints
from coordinator.config import CoordinatorConfig
from coordinator.errors import register_error_handlers
from coordinator.membership import RendezvousView, RendezvousWatcher
from coordinator.metrics import Metrics
from coordinator.state import EXTENSION, CoordinatorState
from coordinator.storage import Storage
from coordinator.storage.ledger import Ledger
from rendezvous.backend import RendezvousBackend
from rendezvous.etcd_auth import EtcdAuthAdmin, EtcdCredentials

logger = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT = 2.0  # seconds per etcd request made while serving


def _etcd_admin(config: CoordinatorConfig
                ) -> tuple[EtcdAuthAdmin | None, EtcdCredentials | None]:
    """The admin that issues per-node etcd users, and its identity, when the config
    names one; (None, None) otherwise."""
    if config.etcd_admin_user is None or config.etcd_admin_password_file is None:
        return None, None
    from rendezvous import backend_from_url
    from rendezvous.etcd import EtcdBackend
    from rendezvous.keys import JobKeys

    try:
        password = Path(config.etcd_admin_password_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the etcd admin password file "
                         f"{config.etcd_admin_password_file!r}: {exc.strerror}") from None
    creds = EtcdCredentials(config.etcd_admin_user, password)
    assert config.rendezvous_url is not None  # CoordinatorConfig checks it
    backend = backend_from_url(config.rendezvous_url, timeout=RENDEZVOUS_TIMEOUT,
                               credentials=creds)
    if not isinstance(backend, EtcdBackend):
        raise ValueError(f"etcd_admin_user needs an etcd rendezvous, not "
                         f"{config.rendezvous_url!r}")
    logger.info("issuing per-node etcd credentials as etcd user %s", creds.user)
    return EtcdAuthAdmin(backend, JobKeys(config.prefix, config.job or "default")), creds


def create_app(config: CoordinatorConfig | None = None, *,
               backend: RendezvousBackend | None = None,
               clock: Callable[[], float] = time.time,
               start_watcher: bool | None = None) -> Flask:
    """Build a coordinator app.

    config: settings (default: `CoordinatorConfig.from_env()`).
    backend: a rendezvous backend to use instead of opening `config.rendezvous_url`
        (tests pass a `MemoryBackend`).
    clock: wall-clock time source (tests move time to check the RAC decay).
    start_watcher: poll the rendezvous in a background thread (default:
        `config.watch_rendezvous`); `app.extensions["horde_coordinator"].close()` stops it.
    """
    config = config or CoordinatorConfig.from_env()
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.compact = True  # type: ignore[attr-defined]

    storage = Storage(config.db_url, sqlite_synchronous=config.sqlite_synchronous)
    storage.upgrade()
    etcd_admin, admin_creds = _etcd_admin(config)
    if backend is None and config.rendezvous_url:
        from rendezvous import backend_from_url

        # reads use HORDE_ETCD_USER's identity; without one, the etcd admin's (if any)
        own = EtcdCredentials.from_env()
        if own is None:
            own = admin_creds
        backend = backend_from_url(config.rendezvous_url, timeout=RENDEZVOUS_TIMEOUT,
                                   credentials=own)
    ledger = Ledger(storage, quorum=config.quorum, half_life_seconds=config.half_life_seconds,
                    clock=clock, trust_reported_membership=config.trust_reported_membership,
                    max_samples_per_round=config.max_samples_per_round,
                    max_span=config.max_span, can_learn_generations=backend is not None)
    if backend is None and not config.trust_reported_membership:
        logger.warning("the coordinator reads no rendezvous, so it cannot verify generations "
                       "and credits nothing; configure --rendezvous (or, for a closed cluster "
                       "of trusted nodes only, trust reported membership)")
    view = None
    if backend is not None:
        view = RendezvousView(backend, config.prefix, config.job or "default")
    metrics = Metrics(storage, view, clock, config.rate_window)
    st = CoordinatorState(config, storage, ledger, view, metrics, clock,
                          etcd_admin=etcd_admin)
    app.extensions[EXTENSION] = st

    register_error_handlers(app)
    register_blueprints(app)
    from coordinator import web

    app.register_blueprint(web.bp)

    @app.after_request
    def _count(response: Response) -> Response:
        st.metrics.responses.labels(str(response.status_code)).inc()
        return response

    if view is not None:
        st.watcher = RendezvousWatcher(view, st.record_membership, config.watch_interval)
        if start_watcher if start_watcher is not None else config.watch_rendezvous:
            st.watcher.start()
    logger.info("coordinator ready: ledger %r (schema %s), rendezvous %s", storage,
                storage.current_revision(),
                f"{config.rendezvous_url or 'given'} job {view.job}" if view else "none")
    return app
