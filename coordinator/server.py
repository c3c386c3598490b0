"""Serving the coordinator with waitress, in the foreground or on a background thread.

`EmbeddedCoordinator` is what `horderun` uses for its zero-configuration default: a
coordinator with a SQLite ledger on a loopback port of this process, stopped at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from types import TracebackType
from typing import Any

from flask import Flask
from waitress import create_server

from coordinator.app import create_app
from coordinator.config import CoordinatorConfig
from coordinator.state import EXTENSION, CoordinatorState
from rendezvous.backend import RendezvousBackend

logger = logging.getLogger(__name__)

DEFAULT_THREADS = 4
CHANNEL_TIMEOUT = 120  # seconds an idle keep-alive connection stays open
STOP_TIMEOUT = 5.0


def make_server(app: Flask, host: str = "127.0.0.1", port: int = 0,
                threads: int = DEFAULT_THREADS) -> Any:
    """A waitress server for `app` bound to (host, port); port 0 picks a free one."""
    st: CoordinatorState = app.extensions[EXTENSION]
    return create_server(
        app, host=host, port=port, threads=threads, ident="horde-coordinator",
        # waitress buffers bodies itself; refuse early what Flask would refuse anyway
        max_request_body_size=st.config.max_body_bytes + 65536,
        channel_timeout=CHANNEL_TIMEOUT, expose_tracebacks=False)


def server_url(server: Any) -> str:
    host = server.effective_host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{int(server.effective_port)}"


def shutdown_server(server: Any, loop_running: bool = True) -> None:
    """Close the listener and every connection, and stop the worker threads.

    With the event loop still running (a server on a background thread), the closing
    runs inside the loop's own thread (through waitress's trigger), which then ends.
    """

    def close_all() -> None:
        for channel in list(server._map.values()):
            with contextlib.suppress(Exception):
                channel.close()
        closed.set()

    closed = threading.Event()
    if loop_running:
        with contextlib.suppress(OSError):
            server.trigger.pull_trigger(close_all)
        closed.wait(STOP_TIMEOUT)
    if not closed.is_set():
        close_all()
    server.task_dispatcher.shutdown(timeout=STOP_TIMEOUT)


class EmbeddedCoordinator:
    """A coordinator on a background thread: `.url`, `.app`, `stop()` (or a `with` block).

    Example (what horderun does)::

        coord = EmbeddedCoordinator(CoordinatorConfig(db_url="sqlite:///run/ledger.db",
                                                      rendezvous_url=etcd.url, job=job))
        print("status page:", coord.url)
    """

    def __init__(self, config: CoordinatorConfig, host: str = "127.0.0.1", port: int = 0,
                 threads: int = DEFAULT_THREADS, backend: RendezvousBackend | None = None,
                 ) -> None:
        self.app = create_app(config, backend=backend)
        self.state: CoordinatorState = self.app.extensions[EXTENSION]
        self._server = make_server(self.app, host, port, threads)
        self.url = server_url(self._server)
        self.port = int(self._server.effective_port)
        self._stopped = False
        self._thread = threading.Thread(target=self._server.run, daemon=True,
                                        name="horde-coordinator")
        self._thread.start()
        atexit.register(self.stop)
        logger.info("coordinator serving at %s", self.url)

    def stop(self) -> None:
        """Stop serving and close the ledger; calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        shutdown_server(self._server)
        self._thread.join(STOP_TIMEOUT)
        self.state.close()
        logger.info("coordinator at %s stopped", self.url)

    def __enter__(self) -> EmbeddedCoordinator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
