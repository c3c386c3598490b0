"""`RendezvousBackend` on a real etcd (v3 API), through the `etcd3gw` HTTP client.

etcd3gw talks to etcd's gRPC gateway (JSON over HTTP), so it works with current
protobuf. Requests are built here, with keys encoded as UTF-8, because the client's
own helpers encode keys as latin-1 and hide the response header (whose revision
the membership logic needs). Every transport failure becomes a
`RendezvousConnectionError` that names the address.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import threading
import time
import weakref
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

from rendezvous.backend import KeyValue, RendezvousBackend
from rendezvous.errors import RendezvousConnectionError, RendezvousError

logger = logging.getLogger(__name__)

URL_SCHEMES = ("etcd", "http")
_MIN_WAIT = 0.01  # seconds; a socket read timeout of 0 would mean non-blocking


def _enc(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def _dec(data: str) -> bytes:
    return base64.b64decode(data)


def _range_end(prefix: str) -> bytes:
    """The first key after every key starting with `prefix` (etcd's prefix range end)."""
    raw = bytearray(prefix.encode("utf-8"))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # every key
    raw[-1] += 1
    return bytes(raw)


def _range(prefix: str) -> dict[str, str]:
    if not prefix:
        return {"key": _enc(b"\0"), "range_end": _enc(b"\0")}
    return {"key": _enc(prefix), "range_end": _enc(_range_end(prefix))}


def _kv(item: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_dec(item["key"]).decode("utf-8"),
        value=_dec(item.get("value", "")),
        mod_revision=int(item.get("mod_revision", 0)),
        create_revision=int(item.get("create_revision", 0)),
        lease=int(item.get("lease", 0)),
    )


def _revision(result: dict[str, Any]) -> int:
    return int(result.get("header", {}).get("revision", 0))


def _is_lease_not_found(exc: Etcd3Exception) -> bool:
    return "lease not found" in (exc.detail_text or "")


class EtcdBackend(RendezvousBackend):
    """A `RendezvousBackend` on an etcd 3.x server reached over its HTTP gateway.

    Safe to share between threads: each thread gets its own HTTP session.
    `ops` counts the etcd requests made, per operation name.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        if not host:
            raise ValueError(f"etcd host {host!r} must be a non-empty host name or address")
        if not 0 < int(port) < 65536:
            raise ValueError(f"etcd port {port!r} must be between 1 and 65535")
        if timeout <= 0:
            raise ValueError(f"etcd timeout {timeout!r} must be a positive number of seconds")
        self.host = host
        self.port = int(port)
        self.timeout = float(timeout)
        self._local = threading.local()
        # Weak: a thread's client (and its sockets) goes away with the thread.
        self._clients: weakref.WeakSet[Etcd3Client] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._api_path: str | None = None  # "/v3/" on etcd >= 3.4; discovered once
        self.ops: dict[str, int] = collections.defaultdict(int)

    @classmethod
    def from_url(cls, url: str, timeout: float = 5.0) -> EtcdBackend:
        """Build a backend from `etcd://host:port` (or `http://host:port`)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (
            parts is None
            or parts.scheme not in URL_SCHEMES
            or not parts.hostname
            or port is None
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise ValueError(
                f"etcd URL {url!r} is not valid; expected etcd://HOST:PORT "
                "(or http://HOST:PORT), for example etcd://127.0.0.1:2379"
            )
        return cls(parts.hostname, port, timeout=timeout)

    @property
    def url(self) -> str:
        """The address as `etcd://host:port`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"etcd://{host}:{self.port}"

    def __repr__(self) -> str:
        return f"EtcdBackend({self.url!r})"

    # -- transport --------------------------------------------------------------------

    def _client(self) -> Etcd3Client:
        """This thread's client; the first one asks the server which API path it serves."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = Etcd3Client(
                host=self.host, port=self.port, timeout=self.timeout, api_path=self._api_path
            )
            if self._api_path is None:
                self._api_path = client.api_path  # one GET /version
            self._local.client = client
            with self._lock:
                self._clients.add(client)
        return client

    def _count(self, op: str) -> None:
        with self._lock:
            self.ops[op] += 1

    def _unreachable(self, exc: BaseException) -> RendezvousConnectionError:
        detail = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
        return RendezvousConnectionError(f"cannot reach etcd at {self.host}:{self.port}: {detail}")

    def _post(self, op: str, path: str, payload: dict[str, Any], lease: int = 0) -> dict[str, Any]:
        """POST one gateway request; wraps every failure in a rendezvous error."""
        self._count(op)
        try:
            client = self._client()
            return client.post(client.get_url(path), data=json.dumps(payload))
        except Etcd3Exception as exc:
            if _is_lease_not_found(exc):
                raise RendezvousError(
                    f"requested lease not found (etcd at {self.host}:{self.port}): "
                    f"lease {lease} expired or was revoked"
                ) from exc
            raise self._unreachable(exc) from exc
        except (requests.RequestException, OSError, ValueError) as exc:
            raise self._unreachable(exc) from exc

    # -- RendezvousBackend ---------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        """Return the key, or None when it does not exist."""
        result = self._post("get", "/kv/range", {"key": _enc(key)})
        kvs = result.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Return every key starting with `prefix`, sorted by key, and the store revision."""
        result = self._post("get_prefix", "/kv/range", _range(prefix))
        kvs = sorted((_kv(item) for item in result.get("kvs", [])), key=lambda kv: kv.key)
        return kvs, _revision(result)

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write the key unconditionally; returns the new store revision."""
        payload: dict[str, Any] = {"key": _enc(key), "value": _enc(value)}
        if lease:
            payload["lease"] = str(lease)
        return _revision(self._post("put", "/kv/put", payload, lease=lease))

    def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: int = 0
    ) -> bool:
        """Write only if the key's mod_revision equals `expected_mod_revision` (0: absent)."""
        if expected_mod_revision == 0:
            compare = {"target": "CREATE", "create_revision": "0"}
        else:
            compare = {"target": "MOD", "mod_revision": str(expected_mod_revision)}
        request_put: dict[str, Any] = {"key": _enc(key), "value": _enc(value)}
        if lease:
            request_put["lease"] = str(lease)
        txn = {
            "compare": [{"key": _enc(key), "result": "EQUAL", **compare}],
            "success": [{"request_put": request_put}],
            "failure": [],
        }
        result = self._post("compare_and_swap", "/kv/txn", txn, lease=lease)
        return bool(result.get("succeeded", False))

    def delete(self, key: str) -> bool:
        """Delete the key; returns whether it existed."""
        result = self._post("delete", "/kv/deleterange", {"key": _enc(key)})
        return int(result.get("deleted", 0)) > 0

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with `prefix`; returns how many were deleted."""
        result = self._post("delete_prefix", "/kv/deleterange", _range(prefix))
        return int(result.get("deleted", 0))

    def grant_lease(self, ttl: int) -> int:
        """Create a lease of `ttl` whole seconds and return its id (etcd may round up)."""
        if ttl < 1:
            raise ValueError(f"lease ttl {ttl!r} must be a whole number of seconds >= 1")
        result = self._post("grant_lease", "/lease/grant", {"TTL": str(int(ttl)), "ID": "0"})
        if result.get("error"):
            raise RendezvousError(f"etcd at {self.host}:{self.port} refused a lease: {result}")
        return int(result["ID"])

    def refresh_lease(self, lease: int) -> bool:
        """Keep the lease alive; returns False when it has already expired."""
        result = self._post("refresh_lease", "/lease/keepalive", {"ID": str(lease)})
        # A stream answer: {"result": {...}}; etcd leaves TTL out (0) for a dead lease.
        body = result.get("result", result)
        return int(body.get("TTL", 0)) > 0

    def revoke_lease(self, lease: int) -> None:
        """End the lease now; every key bound to it is deleted (unknown leases are ignored)."""
        try:
            self._post("revoke_lease", "/lease/revoke", {"ID": str(lease)}, lease=lease)
        except RendezvousError as exc:
            if isinstance(exc, RendezvousConnectionError):
                raise
            logger.debug("revoking lease %d: already gone", lease)

    def wait_for_change(self, prefix: str, after_revision: int, timeout: float) -> bool:
        """Block until a key under `prefix` changes after `after_revision`, or `timeout` s.

        Opens an etcd watch from `after_revision + 1` on this thread and closes it on
        return, so no watcher thread or server-side watch outlives the call.
        """
        self._count("wait_for_change")
        deadline = time.monotonic() + max(0.0, timeout)
        request = {"create_request": {**_range(prefix), "start_revision": str(after_revision + 1)}}
        response: requests.Response | None = None
        try:
            client = self._client()
            response = client.session.post(
                client.get_url("/watch"),
                data=json.dumps(request),
                stream=True,
                timeout=(self.timeout, max(_MIN_WAIT, timeout)),
            )
            if response.status_code != 200:
                raise RendezvousConnectionError(
                    f"cannot reach etcd at {self.host}:{self.port}: watch answered "
                    f"HTTP {response.status_code}: {response.text[:200]}"
                )
            return self._read_watch(response, deadline)
        except requests.exceptions.ReadTimeout:
            return False
        except requests.exceptions.ConnectionError as exc:
            # requests reports a read timeout inside a streamed body as ConnectionError.
            if exc.args and isinstance(exc.args[0], urllib3.exceptions.ReadTimeoutError):
                return False
            raise self._unreachable(exc) from exc
        except (requests.RequestException, Etcd3Exception, OSError, ValueError) as exc:
            raise self._unreachable(exc) from exc
        finally:
            if response is not None:
                response.close()

    def _read_watch(self, response: requests.Response, deadline: float) -> bool:
        """Read watch messages (one JSON object a line) until an event or the deadline."""
        buffer = b""
        for chunk in response.iter_content(chunk_size=None):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:
                    raise RendezvousConnectionError(
                        f"cannot reach etcd at {self.host}:{self.port}: watch failed: "
                        f"{message['error']}"
                    )
                result = message.get("result", {})
                if result.get("events"):
                    return True
                if int(result.get("compact_revision", 0)):
                    # The history after `after_revision` was compacted: things changed.
                    return True
                if result.get("canceled"):
                    raise RendezvousConnectionError(
                        f"cannot reach etcd at {self.host}:{self.port}: watch canceled: "
                        f"{result.get('cancel_reason', 'no reason given')}"
                    )
            if time.monotonic() >= deadline:
                return False
        return False

    def close(self) -> None:
        """Close the HTTP sessions of every thread that used this backend."""
        with self._lock:
            clients = list(self._clients)
            self._clients = weakref.WeakSet()
        for client in clients:
            client.session.close()
        self._local = threading.local()
