"""How the etcd backend and the embedded server fail: promptly, wrapped, and clean."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rendezvous import (
    EmbeddedEtcd,
    EtcdBackend,
    MemoryBackend,
    RendezvousConnectionError,
    RendezvousError,
    backend_from_url,
)
from rendezvous import embedded as embedded_module
from rendezvous.embedded import free_port


def _port_is_closed(port: int) -> bool:
    """Nothing accepts on `port`, and a new listener may bind it."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    return True


# -- unreachable or misbehaving servers ------------------------------------------------


def test_nothing_listening_raises_connection_error_promptly() -> None:
    port = free_port()
    backend = EtcdBackend("127.0.0.1", port, timeout=2.0)
    calls = [
        lambda: backend.get("/k"),
        lambda: backend.put("/k", b"v"),
        lambda: backend.get_prefix("/k"),
        lambda: backend.compare_and_swap("/k", 0, b"v"),
        lambda: backend.grant_lease(5),
        lambda: backend.refresh_lease(1),
        lambda: backend.revoke_lease(1),
        lambda: backend.wait_for_change("/k", 1, 1.0),
    ]
    for call in calls:
        start = time.monotonic()
        with pytest.raises(RendezvousConnectionError, match=f"127.0.0.1:{port}") as info:
            call()
        assert time.monotonic() - start < 1.0
        assert str(info.value).startswith(f"cannot reach etcd at 127.0.0.1:{port}: ")
        assert info.value.__cause__ is not None


def test_silent_server_times_out_as_connection_error() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        backend = EtcdBackend("127.0.0.1", port, timeout=0.3)
        start = time.monotonic()
        with pytest.raises(RendezvousConnectionError, match=f"127.0.0.1:{port}"):
            backend.get("/k")
        assert time.monotonic() - start < 2.0


class _Failing(http.server.BaseHTTPRequestHandler):
    """Answers /version like etcd 3.5, and every API call with HTTP 500 or 503."""

    def do_GET(self) -> None:
        body = json.dumps({"etcdserver": "3.5.1", "etcdcluster": "3.5.0"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        code = 503 if "lease" in self.path else 500
        body = b'{"error":"etcdserver: something broke","code":13}'
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass


@pytest.fixture
def failing_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_http_5xx_is_a_connection_error(failing_server: int) -> None:
    backend = EtcdBackend("127.0.0.1", failing_server, timeout=2.0)
    with pytest.raises(RendezvousConnectionError, match="something broke"):
        backend.put("/k", b"v")
    with pytest.raises(RendezvousConnectionError, match=f"127.0.0.1:{failing_server}"):
        backend.grant_lease(5)
    with pytest.raises(RendezvousConnectionError, match="HTTP 500"):
        backend.wait_for_change("/k", 1, 0.5)
    backend.close()


# -- URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("etcd://127.0.0.1:2379", "127.0.0.1", 2379),
        ("http://etcd.example.org:12379", "etcd.example.org", 12379),
        ("etcd://[::1]:2379/", "::1", 2379),
    ],
)
def test_from_url_accepts(url: str, host: str, port: int) -> None:
    backend = EtcdBackend.from_url(url)
    assert (backend.host, backend.port) == (host, port)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:2379",
        "etcd://127.0.0.1",
        "etcd://:2379",
        "https://127.0.0.1",
        "redis://127.0.0.1:2379",
        "etcd://127.0.0.1:99999",
        "etcd://127.0.0.1:port",
        "etcd://127.0.0.1:2379/v3/kv",
        "etcd://127.0.0.1:2379?x=1",
    ],
)
def test_from_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="expected etcd://HOST:PORT") as info:
        EtcdBackend.from_url(url)
    assert repr(url) in str(info.value)


def test_backend_from_url() -> None:
    assert isinstance(backend_from_url("memory://"), MemoryBackend)
    etcd = backend_from_url("etcd://127.0.0.1:2379")
    assert isinstance(etcd, EtcdBackend) and etcd.port == 2379
    with pytest.raises(ValueError, match="'zk://h:1'.*expected etcd://HOST:PORT"):
        backend_from_url("zk://h:1")


# -- the embedded server ---------------------------------------------------------------------


def test_embedded_stop_cleans_up() -> None:
    server = EmbeddedEtcd()
    data_dir, port, pid = server.data_dir, server.port, server.pid
    assert server.url == f"etcd://127.0.0.1:{port}" and server.host == "127.0.0.1"
    assert data_dir.is_dir() and pid is not None
    backend = EtcdBackend.from_url(server.url)
    backend.put("/k", b"v")
    server.stop()
    assert not data_dir.exists()
    assert server.pid is None
    assert _port_is_closed(port)
    with pytest.raises(RendezvousConnectionError):
        backend.get("/k")
    server.stop()  # harmless
    backend.close()


def test_embedded_as_context_manager() -> None:
    with EmbeddedEtcd() as server:
        data_dir = server.data_dir
        backend = EtcdBackend.from_url(server.url)
        assert backend.get("/nothing") is None
        backend.close()
    assert not data_dir.exists()
    assert _port_is_closed(server.port)


def test_embedded_start_failure_names_the_cause(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as busy:  # every port etcd is offered is taken
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        monkeypatch.setattr(embedded_module, "free_port", lambda host="": busy_port)
        monkeypatch.setattr(embedded_module, "_START_ATTEMPTS", 2)  # one retry, then give up
        created: list[Path] = []
        real_mkdtemp = embedded_module.tempfile.mkdtemp

        def mkdtemp(**kwargs: str) -> str:
            path = real_mkdtemp(dir=tmp_path, **kwargs)
            created.append(Path(path))
            return path

        monkeypatch.setattr(embedded_module.tempfile, "mkdtemp", mkdtemp)
        start = time.monotonic()
        with pytest.raises(RendezvousError, match="exited with code") as info:
            EmbeddedEtcd(start_timeout=10.0)
        assert "address already in use" in str(info.value)
        assert time.monotonic() - start < 10.0
    assert created and not any(path.exists() for path in created)


# -- definite answers from a reachable etcd ----------------------------------------------


def test_a_refusal_from_a_reachable_etcd_is_not_reported_as_unreachable(fresh_etcd) -> None:
    """etcd answers 'user name already exists' (gRPC FAILED_PRECONDITION): the error says
    what etcd refused and why, not 'cannot reach etcd', and no other member is tried."""
    backend = EtcdBackend.from_url(fresh_etcd.url)
    backend._post("auth_user_add", "/auth/user/add", {"name": "alice", "password": "pw"})
    with pytest.raises(RendezvousError) as info:
        backend._post("auth_user_add", "/auth/user/add", {"name": "alice", "password": "pw"})
    assert not isinstance(info.value, RendezvousConnectionError)
    message = str(info.value)
    assert "cannot reach" not in message
    assert "/auth/user/add" in message and "user name already exists" in message
    assert backend.failovers == 0 and backend.get("/k") is None  # the member is still used
