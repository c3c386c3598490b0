"""`RendezvousBackend` on a real etcd (v3 API), through the `etcd3gw` HTTP client.

etcd3gw talks to etcd's gRPC gateway (JSON over HTTP), so it works with current
protobuf. Requests are built here, with keys encoded as UTF-8, because the client's
own helpers encode keys as latin-1 and hide the response header (whose revision
the membership logic needs). Every transport failure becomes a
`RendezvousConnectionError` that names the address.

Several endpoints (the members of one etcd cluster, `etcd://h1:2379,h2:2379,h3:2379`)
are tried in order of preference: the member that answered last first, members that
failed recently last. A request that fails to connect, times out or gets a 5xx from one
member goes to the next. Leases and revisions belong to the cluster, not to a member,
so a lease stays alive and a watch resumes at `revision + 1` on whichever member
answers; a compare-and-swap whose answer was lost is settled by reading the key back.

`https://host:port[,...]` talks TLS (settings: `rendezvous.etcd_tls.EtcdTLS`); a
certificate that does not verify is a `RendezvousTLSError` that says which setting to
change, never a silent fallback to an unverified connection.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
import urllib3
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

from rendezvous.backend import KeyValue, RendezvousBackend
from rendezvous.errors import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousPermissionError,
    RendezvousTLSError,
)
from rendezvous.etcd_tls import EtcdTLS

logger = logging.getLogger(__name__)

URL_SCHEMES = ("etcd", "http", "https")
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


#: etcd's answers when a request's identity may not do it (no failover: every member agrees).
_DENIED = ("permission denied", "authentication failed", "user name is empty",
           "user name not found", "role name not found")
#: etcd's answers when a token expired or the server restarted: authenticate again.
_STALE_TOKEN = ("invalid auth token",)


#: gRPC codes with which a reachable member answers a request it will not carry out
#: (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, OUT_OF_RANGE):
#: another member would answer the same, so these are errors, never a failover.
_REFUSAL_CODES = frozenset({3, 5, 6, 9, 11})


def _refusal(exc: Etcd3Exception) -> str | None:
    """etcd's own message when `exc` is a definite refusal (see `_REFUSAL_CODES`)."""
    if type(exc) is not Etcd3Exception:  # the subclasses are timeouts and 5xx answers
        return None
    try:
        body = json.loads(exc.detail_text or "")
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("code") not in _REFUSAL_CODES:
        return None
    message = body.get("message") or body.get("error")
    if not isinstance(message, str):
        return None
    return f"{' '.join(message.split())[:300]} (gRPC code {body['code']})"


def _auth_problem(exc: Etcd3Exception, words: tuple[str, ...]) -> bool:
    text = (exc.detail_text or "").lower()
    return any(word in text for word in words)


#: Seconds a member that failed is tried after the others (unless all have failed).
FAILED_COOLDOWN = 5.0


@dataclass(frozen=True)
class Endpoint:
    """One etcd member's client address."""

    host: str
    port: int

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class _Failover(Exception):
    """This member failed in a way another member may not (connection, timeout, 5xx);
    `tls` says what to fix when TLS was the cause."""

    def __init__(self, detail: str, tls: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.tls = tls


class _TLSAdapter(requests.adapters.HTTPAdapter):
    """Sends every https request with these TLS settings. requests lets REQUESTS_CA_BUNDLE
    (or CURL_CA_BUNDLE) override a session's own CA bundle; this adapter does not, so
    HORDE_ETCD_CACERT always decides (and verification is never off)."""

    def __init__(self, tls: EtcdTLS) -> None:
        super().__init__()
        self.tls = tls

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
             ) -> requests.Response:
        kwargs["verify"] = self.tls.verify
        kwargs["cert"] = self.tls.client_cert
        return super().send(request, *args, **kwargs)


#: The reason inside an SSL error's text, e.g. `[SSL: CERTIFICATE_VERIFY_FAILED] ...`.
_SSL_REASON = re.compile(r"\[SSL(: [A-Z0-9_]+)?\][^'\")]*")


def _tls_problem(text: str, tls: EtcdTLS | None) -> str | None:
    """What to fix, when `text` (a transport error) says TLS failed in a way retrying
    cannot fix (a `RendezvousTLSError`); None otherwise."""
    lowered = text.lower()
    if "http request to an https server" in lowered:
        return ("etcd serves https there: give the URL as https://HOST:PORT and set "
                "HORDE_ETCD_CACERT (horderun --etcd-cacert) to the CA file that signed "
                "etcd's certificate")
    if tls is None:
        return None
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        if "mismatch" in lowered:
            return ("etcd's certificate does not name the host or address in the URL: use "
                    "a name or address its certificate lists (its subject alternative "
                    "names), or have it reissued to cover this one")
        where = (f"HORDE_ETCD_CACERT={tls.cacert!r}" if tls.cacert is not None
                 else "the system's trusted CAs (HORDE_ETCD_CACERT is not set)")
        return (f"etcd's certificate does not verify against {where}: set "
                "HORDE_ETCD_CACERT (horderun --etcd-cacert) to the CA file that signed "
                "etcd's certificate (for `horderun --etcd-tls`: the ca.crt it printed)")
    if "wrong_version_number" in lowered or "wrong version number" in lowered \
            or "record layer failure" in lowered or "packet length too long" in lowered:
        return ("etcd does not speak TLS there: give the URL as etcd://HOST:PORT (plain "
                "HTTP), or start etcd with --cert-file/--key-file")
    if "alert" in lowered and any(word in lowered for word in (
            "certificate required", "bad certificate", "unknown ca", "certificate unknown",
            "certificate expired", "certificate revoked", "unsupported certificate")):
        given = (f"HORDE_ETCD_CERT={tls.cert!r}" if tls.cert is not None
                 else "no client certificate (HORDE_ETCD_CERT is not set)")
        return (f"etcd refused this client's certificate ({given}): it requires one "
                "signed by its --trusted-ca-file; set HORDE_ETCD_CERT and HORDE_ETCD_KEY "
                "(horderun --etcd-cert/--etcd-key) to such a certificate and its key")
    if "pem lib" in lowered or "key values mismatch" in lowered or "no_certificate" in lowered \
            or "no certificate or crl found" in lowered:
        return (f"the TLS files could not be loaded (HORDE_ETCD_CACERT={tls.cacert!r}, "
                f"HORDE_ETCD_CERT={tls.cert!r}, HORDE_ETCD_KEY={tls.key!r}): check that the CA "
                "file holds a PEM certificate and that the key belongs to the certificate")
    # Anything else (a handshake cut short, a reset) may be a server restarting or the
    # network: a connection problem, retried and failed over like any other.
    return None


def parse_endpoints(url: str) -> list[Endpoint]:
    """`etcd://h1:2379,h2:2379` (or `http://...`) -> its endpoints; ValueError if invalid."""
    bad = ValueError(
        f"etcd URL {url!r} is not valid; expected etcd://HOST:PORT (or http://HOST:PORT, "
        "or https://HOST:PORT for TLS), or several members of one cluster as "
        "etcd://HOST1:PORT1,HOST2:PORT2,HOST3:PORT3, for example etcd://127.0.0.1:2379")
    if not isinstance(url, str) or "://" not in url:
        raise bad
    scheme, rest = url.split("://", 1)
    if scheme not in URL_SCHEMES or not rest:
        raise bad
    endpoints: list[Endpoint] = []
    items = rest.split(",")
    for index, item in enumerate(items):
        # A trailing slash is allowed after the last member only.
        if index == len(items) - 1 and item.endswith("/"):
            item = item[:-1]
        try:
            parts = urlsplit(f"{scheme}://{item}")
            port = parts.port
        except ValueError:
            raise bad from None
        if (not item or not parts.hostname or port is None or parts.path or parts.query
                or parts.fragment or parts.username or parts.password or "/" in item):
            raise bad
        endpoint = Endpoint(parts.hostname, port)
        if endpoint in endpoints:
            raise ValueError(f"etcd URL {url!r} lists {endpoint.label} twice")
        endpoints.append(endpoint)
    return endpoints


class EtcdBackend(RendezvousBackend):
    """A `RendezvousBackend` on an etcd 3.x server (or cluster) reached over its HTTP gateway.

    Safe to share between threads: each thread gets its own HTTP session per member.
    `ops` counts the etcd requests made, per operation name; `failovers` counts the
    times a request moved to another member. `endpoint` is the member in use.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0,
                 endpoints: Sequence[tuple[str, int]] | None = None,
                 user: str | None = None, password: str | None = None,
                 tls: EtcdTLS | None = None) -> None:
        pairs = list(endpoints) if endpoints else [(host, port)]
        checked: list[Endpoint] = []
        for h, p in pairs:
            if not h:
                raise ValueError(f"etcd host {h!r} must be a non-empty host name or address")
            if not 0 < int(p) < 65536:
                raise ValueError(f"etcd port {p!r} must be between 1 and 65535")
            checked.append(Endpoint(h, int(p)))
        if timeout <= 0:
            raise ValueError(f"etcd timeout {timeout!r} must be a positive number of seconds")
        self.endpoints: tuple[Endpoint, ...] = tuple(checked)
        self.timeout = float(timeout)
        self._local = threading.local()
        # Weak: a thread's clients (and their sockets) go away with the thread.
        self._clients: weakref.WeakSet[Etcd3Client] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._api_path: str | None = None  # "/v3/" on etcd >= 3.4; discovered once
        self._preferred = 0
        self._failed_at: dict[int, float] = {}
        self.ops: dict[str, int] = collections.defaultdict(int)
        self.failovers = 0
        if (user is None) != (password is None) or user == "":
            raise ValueError("etcd credentials need both a non-empty user name and a password "
                             "(HORDE_ETCD_USER and HORDE_ETCD_PASSWORD_FILE), or neither")
        #: etcd user this backend authenticates as (None: no authentication).
        self.user = user
        self._password = password
        self._token: str | None = None  # etcd's simple/JWT token, shared by every thread
        #: TLS settings (None: plain HTTP); every member is reached the same way.
        self.tls = tls

    @classmethod
    def from_url(cls, url: str, timeout: float = 5.0, user: str | None = None,
                 password: str | None = None, tls: EtcdTLS | None = None) -> EtcdBackend:
        """Build a backend from `etcd://host:port` (or `http://host:port`), or from several
        members of one cluster: `etcd://h1:2379,h2:2379,h3:2379` (tried in that order).
        `https://...` talks TLS with `tls` (default: the system's CAs); other schemes
        ignore `tls`. With `user`/`password` every request carries an etcd auth token."""
        endpoints = parse_endpoints(url)
        first = endpoints[0]
        if url.split("://", 1)[0].lower() == "https":
            tls = tls if tls is not None else EtcdTLS()
        else:
            if tls is not None and tls.configured:
                logger.warning("etcd TLS settings (%s) are set but the rendezvous URL %s is "
                               "plain HTTP: they are not used; give it as https://",
                               ", ".join(tls.to_env()), url)
            tls = None
        return cls(first.host, first.port, timeout=timeout,
                   endpoints=[(e.host, e.port) for e in endpoints], user=user,
                   password=password, tls=tls)

    @property
    def endpoint(self) -> Endpoint:
        """The member requests go to first (the one that answered last)."""
        return self.endpoints[self._preferred]

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def port(self) -> int:
        return self.endpoint.port

    @property
    def url(self) -> str:
        """Every member as `etcd://h1:p1,h2:p2` (one member: `etcd://host:port`), or
        `https://...` with TLS."""
        scheme = "https" if self.tls is not None else "etcd"
        return f"{scheme}://" + ",".join(e.label for e in self.endpoints)

    def __repr__(self) -> str:
        return f"EtcdBackend({self.url!r})"

    # -- transport --------------------------------------------------------------------

    def _client(self, index: int | None = None) -> Etcd3Client:
        """This thread's client of member `index` (default: the preferred one); the first
        client asks which API path the server serves."""
        if index is None:
            index = self._preferred
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(index)
        if client is None:
            endpoint = self.endpoints[index]
            tls = self.tls
            client = Etcd3Client(host=endpoint.host, port=endpoint.port, timeout=self.timeout,
                                 api_path=self._api_path,
                                 protocol="https" if tls is not None else "http")
            if tls is not None:
                client.session.mount("https://", _TLSAdapter(tls))
            if self._api_path is None:
                self._api_path = client.api_path  # one GET /version
            clients[index] = client
            if self.user is not None:
                self._authorize(client)
            with self._lock:
                self._clients.add(client)
        return client

    def _authorize(self, client: Etcd3Client, stale: str | None = None) -> None:
        """Put this backend's etcd token on `client`'s session, asking etcd for one (the
        gateway's /auth/authenticate) when there is none or `stale` was refused."""
        with self._lock:
            token = self._token
        if token is None or token == stale:
            try:
                answer = client.post(client.get_url("/auth/authenticate"),
                                     data=json.dumps({"name": self.user,
                                                      "password": self._password}))
            except Etcd3Exception as exc:
                if _auth_problem(exc, _DENIED + ("auth",)):
                    raise RendezvousPermissionError(
                        f"etcd at {client.host}:{client.port} refused user {self.user!r}: "
                        f"{self._detail(exc)}; check HORDE_ETCD_USER / HORDE_ETCD_PASSWORD_FILE "
                        "(the user may have been revoked)") from exc
                raise
            token = answer.get("token") if isinstance(answer, dict) else None
            if not isinstance(token, str) or not token or len(token) > 4096:
                raise RendezvousPermissionError(
                    f"etcd at {client.host}:{client.port} answered authenticate for "
                    f"{self.user!r} without a usable token; is auth enabled there?")
            with self._lock:
                self._token = token
        client.session.headers["Authorization"] = token

    def _count(self, op: str) -> None:
        with self._lock:
            self.ops[op] += 1

    def _order(self) -> list[int]:
        """Members to try, best first: the preferred one, then those that have not failed
        lately (in the order given), then the failed ones (the longest ago first)."""
        now = time.monotonic()
        with self._lock:
            preferred, failed = self._preferred, dict(self._failed_at)
        indices = list(range(len(self.endpoints)))
        fresh = [i for i in indices if now - failed.get(i, -1e18) >= FAILED_COOLDOWN]
        stale = sorted((i for i in indices if i not in fresh), key=lambda i: failed[i])
        order = fresh + stale
        if preferred in fresh:
            order.remove(preferred)
            order.insert(0, preferred)
        return order

    def _succeeded(self, index: int) -> None:
        with self._lock:
            self._failed_at.pop(index, None)
            if index == self._preferred:
                return
            previous = self.endpoints[self._preferred]
            self._preferred = index
            self.failovers += 1
        logger.warning("etcd: now using member %s (was %s)", self.endpoints[index].label,
                       previous.label)

    def _failed(self, index: int, detail: str) -> None:
        with self._lock:
            self._failed_at[index] = time.monotonic()
        if len(self.endpoints) > 1:
            logger.info("etcd member %s failed: %s", self.endpoints[index].label, detail)

    def _unreachable(self, errors: list[tuple[int, str]], tls: str | None = None
                     ) -> RendezvousError:
        if tls is not None:
            tried = "; ".join(f"{self.endpoints[i].label}: {detail}" for i, detail in errors)
            return RendezvousTLSError(f"TLS to etcd at {self.url} failed: {tls} ({tried})")
        if len(self.endpoints) == 1:
            endpoint = self.endpoints[0]
            return RendezvousConnectionError(
                f"cannot reach etcd at {endpoint.host}:{endpoint.port}: {errors[-1][1]}")
        majority = len(self.endpoints) // 2 + 1
        tried = "; ".join(f"{self.endpoints[i].label}: {detail}" for i, detail in errors)
        return RendezvousConnectionError(
            f"cannot reach etcd at any of its {len(self.endpoints)} members "
            f"({', '.join(e.label for e in self.endpoints)}): {tried}. The cluster answers "
            f"only while a majority ({majority} of {len(self.endpoints)}) of its members are "
            "up and reach each other: if some answered with a timeout or 'no leader', it has "
            "lost its quorum")

    def _detail(self, exc: BaseException) -> str:
        """What went wrong, in a few words (urllib3's messages run to hundreds of characters)."""
        text = " ".join(str(getattr(exc, "detail_text", None) or exc or
                            type(exc).__name__).split())
        if "Connection refused" in text:
            return "connection refused"
        ssl_reason = _SSL_REASON.search(text)
        if ssl_reason:
            reason = ssl_reason.group(0).strip()
            if "UNEXPECTED_EOF" in reason or "EOF occurred" in reason:
                reason += (" (the server ended the TLS handshake: if etcd serves plain HTTP "
                           "there, give the URL as etcd://HOST:PORT)")
            return reason
        # A TLS server that reads a plain request closes the connection, or, when the
        # request is still arriving, resets it.
        if self.tls is None and ("closed connection without response" in text
                                 or "Connection reset by peer" in text):
            return ("the server closed the connection without answering (if etcd serves "
                    "https there, give the URL as https://HOST:PORT and set HORDE_ETCD_CACERT)")
        if "Read timed out" in text or "timed out" in text.lower() and "etcdserver" not in text:
            return f"no answer within {self.timeout:g} s"
        return text[:300]

    def _post_once(self, index: int, path: str, payload: dict[str, Any], lease: int
                   ) -> dict[str, Any]:
        """One request to one member: `_Failover` when another member may do better."""
        endpoint = self.endpoints[index]
        try:
            client = self._client(index)
            try:
                return client.post(client.get_url(path), data=json.dumps(payload))
            except Etcd3Exception as exc:
                if self.user is None or not _auth_problem(exc, _STALE_TOKEN):
                    raise
                # Tokens expire (--auth-token-ttl) and die with a restart: get a new one.
                self._authorize(client, stale=client.session.headers.get("Authorization"))
                return client.post(client.get_url(path), data=json.dumps(payload))
        except Etcd3Exception as exc:
            if _auth_problem(exc, _DENIED):
                who = f"user {self.user!r}" if self.user else "an unauthenticated client"
                raise RendezvousPermissionError(
                    f"etcd at {endpoint.label} refused {path} for {who}: "
                    f"{self._detail(exc)}") from exc
            if _is_lease_not_found(exc):
                raise RendezvousError(
                    f"requested lease not found (etcd at {endpoint.label}): "
                    f"lease {lease} expired or was revoked"
                ) from exc
            refusal = _refusal(exc)
            if refusal is not None:
                raise RendezvousError(
                    f"etcd at {endpoint.label} refused {path}: {refusal}") from exc
            raise self._failover(exc) from exc
        except (requests.RequestException, OSError, ValueError) as exc:
            raise self._failover(exc) from exc

    def _failover(self, exc: BaseException) -> _Failover:
        text = " ".join(str(getattr(exc, "detail_text", None) or exc or "").split())
        return _Failover(self._detail(exc), _tls_problem(text, self.tls))

    def _request(self, op: str, path: str, payload: dict[str, Any], lease: int = 0
                 ) -> tuple[dict[str, Any], bool]:
        """POST one gateway request to the best member that answers; returns the answer
        and whether an earlier member failed first (its request may have been applied)."""
        self._count(op)
        errors: list[tuple[int, str]] = []
        last: BaseException | None = None
        tls: str | None = None
        for index in self._order():
            try:
                result = self._post_once(index, path, payload, lease)
            except _Failover as exc:
                errors.append((index, exc.detail))
                last = exc.__cause__ or exc
                tls = tls or exc.tls
                self._failed(index, exc.detail)
                continue
            self._succeeded(index)
            return result, bool(errors)
        raise self._unreachable(errors, tls) from last

    def _post(self, op: str, path: str, payload: dict[str, Any], lease: int = 0) -> dict[str, Any]:
        """POST one gateway request; wraps every failure in a rendezvous error."""
        return self._request(op, path, payload, lease)[0]

    # -- RendezvousBackend ---------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        """Return the key, or None when it does not exist."""
        result = self._post("get", "/kv/range", {"key": _enc(key)})
        kvs = result.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Return every key starting with `prefix`, sorted by key, and the store revision."""
        result = self._post("get_prefix", "/kv/range", _range(prefix))
        kvs = []
        for item in result.get("kvs", []):
            try:
                kvs.append(_kv(item))
            except (UnicodeDecodeError, binascii.Error, KeyError, TypeError, ValueError):
                # Anyone who reaches etcd can write a key that is not UTF-8: skip it.
                from rendezvous.records import report_invalid

                try:
                    shown = _dec(item["key"]).decode("utf-8", "backslashreplace")
                    revision = int(item.get("mod_revision", 0))
                except (binascii.Error, KeyError, TypeError, ValueError, AttributeError):
                    shown, revision = f"{prefix}(unreadable)", 0
                report_invalid(shown, revision, "the key is not UTF-8 text")
        kvs.sort(key=lambda kv: kv.key)
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
        """Write only if the key's mod_revision equals `expected_mod_revision` (0: absent).

        When a member failed first, the write may have been applied there and the retry
        then fails its compare: the key holding exactly this value and lease, written
        after `expected_mod_revision`, means the first attempt won.
        """
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
        result, retried = self._request("compare_and_swap", "/kv/txn", txn, lease=lease)
        succeeded = bool(result.get("succeeded", False))
        if succeeded or not retried:
            return succeeded
        current = self.get(key)
        won = (current is not None and current.value == value and current.lease == lease
               and current.mod_revision > expected_mod_revision)
        if won:
            logger.info("etcd: compare-and-swap of %s was applied before its member failed",
                        key)
        return won

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
            raise RendezvousError(f"etcd at {self.endpoint.label} refused a lease: {result}")
        try:
            return int(result["ID"])
        except (KeyError, TypeError, ValueError):
            raise RendezvousError(
                f"etcd at {self.endpoint.label} answered a lease grant without a lease id: "
                f"{str(result)[:200]}") from None

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
        return, so no watcher thread or server-side watch outlives the call. When the
        member fails, the watch goes on from the same revision on the next member.
        """
        self._count("wait_for_change")
        deadline = time.monotonic() + max(0.0, timeout)
        errors: list[tuple[int, str]] = []
        last: BaseException | None = None
        tls: str | None = None
        for index in self._order():
            remaining = max(_MIN_WAIT, deadline - time.monotonic())
            try:
                changed = self._watch_once(index, prefix, after_revision, remaining, deadline)
            except _Failover as exc:
                errors.append((index, exc.detail))
                last = exc.__cause__ or exc
                tls = tls or exc.tls
                self._failed(index, exc.detail)
                continue
            self._succeeded(index)
            return changed
        raise self._unreachable(errors, tls) from last

    def _watch_once(self, index: int, prefix: str, after_revision: int, wait: float,
                    deadline: float) -> bool:
        request = {"create_request": {**_range(prefix), "start_revision": str(after_revision + 1)}}
        response: requests.Response | None = None
        try:
            client = self._client(index)
            response = client.session.post(
                client.get_url("/watch"),
                data=json.dumps(request),
                stream=True,
                timeout=(self.timeout, wait),
            )
            if response.status_code != 200:
                text = response.text[:200]
                raise _Failover(f"watch answered HTTP {response.status_code}: {text}",
                                _tls_problem(text, self.tls))
            return self._read_watch(response, deadline)
        except requests.exceptions.ReadTimeout:
            return False
        except requests.exceptions.ConnectionError as exc:
            # requests reports a read timeout inside a streamed body as ConnectionError.
            if exc.args and isinstance(exc.args[0], urllib3.exceptions.ReadTimeoutError):
                return False
            raise self._failover(exc) from exc
        except (requests.RequestException, Etcd3Exception, OSError, ValueError) as exc:
            raise self._failover(exc) from exc
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
                if not isinstance(message, dict):
                    raise _Failover(f"watch sent {str(message)[:100]!r}, not a JSON object")
                if "error" in message:
                    raise _Failover(f"watch failed: {message['error']}")
                result = message.get("result", {})
                if result.get("events"):
                    return True
                if int(result.get("compact_revision", 0)):
                    # The history after `after_revision` was compacted: things changed,
                    # and the caller reads the keys again.
                    return True
                if result.get("canceled"):
                    raise _Failover(
                        f"watch canceled: {result.get('cancel_reason', 'no reason given')}")
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
