"""An HTTP client of one or several coordinators (`http://c1:8080,http://c2:8080`).

Coordinators that share one database are interchangeable: a request that cannot connect,
times out or gets a 5xx (or 429) from one goes to the next, and the client keeps using
whichever answered last. Every request Horde sends a coordinator is safe to repeat (a
report is stored once per (job, generation, round, reporter), whichever coordinator gets
it), so a request whose answer was lost may be sent again elsewhere.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

if TYPE_CHECKING:
    from rendezvous.etcd_auth import EtcdCredentials

logger = logging.getLogger(__name__)

#: Answers that say "this coordinator cannot serve now", so another one is tried.
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def parse_urls(text: str) -> list[str]:
    """`http://c1:8080,https://c2` -> the coordinator base URLs; ValueError when invalid."""
    urls: list[str] = []
    for item in (text or "").split(","):
        item = item.strip().rstrip("/")
        try:
            parts = urlsplit(item)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            parts = None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                or parts.query or parts.fragment):
            raise ValueError(
                f"coordinator URL {item!r} in {text!r} is not valid; expected http(s)://HOST"
                "[:PORT], or several coordinators of one ledger separated by commas "
                "(http://c1:8080,http://c2:8080)")
        if item in urls:
            raise ValueError(f"coordinator URL {item!r} is listed twice in {text!r}")
        urls.append(item)
    return urls


class CoordinatorClient:
    """Sends requests to the first coordinator that answers; remembers which one did."""

    def __init__(self, urls: str | list[str], session: requests.Session | None = None) -> None:
        self.urls = parse_urls(urls) if isinstance(urls, str) else parse_urls(",".join(urls))
        self.session = session or requests.Session()
        self._lock = threading.Lock()
        self._current = 0
        self.failovers = 0

    @property
    def url(self) -> str:
        """The coordinator in use (the one that answered last)."""
        return self.urls[self._current]

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """`method path` on the coordinator in use, then on the others in order.

        Returns the first answer that is not a retryable status; when every coordinator
        fails, returns the last retryable answer, or raises the last connection error.
        """
        with self._lock:
            start = self._current
        answer: requests.Response | None = None
        error: requests.RequestException | None = None
        for step in range(len(self.urls)):
            index = (start + step) % len(self.urls)
            base = self.urls[index]
            try:
                response = self.session.request(method, base + path, **kwargs)
            except requests.RequestException as exc:
                error, answer = exc, None
                self._note_failure(base, str(exc))
                continue
            if response.status_code in RETRY_STATUS and len(self.urls) > 1:
                answer, error = response, None
                self._note_failure(base, f"HTTP {response.status_code}")
                continue
            self._use(index)
            return response
        if answer is not None:
            return answer
        assert error is not None
        raise error

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def _note_failure(self, base: str, why: str) -> None:
        if len(self.urls) > 1:
            logger.info("coordinator %s failed (%s); trying the next one", base, why[:200])

    def _use(self, index: int) -> None:
        with self._lock:
            if index == self._current:
                return
            previous, self._current = self.urls[self._current], index
            self.failovers += 1
        logger.warning("coordinator: now using %s (%s failed)", self.urls[index], previous)

    def close(self) -> None:
        self.session.close()


class CredentialsRefused(Exception):
    """The coordinator would not issue a node's etcd credentials (the message says why)."""


def etcd_ca_from_answer(raw: bytes) -> str | None:
    """The `etcd_ca` (PEM text, at most 64 KiB) of an etcd-credentials answer, unchecked:
    trust it only through a pinned fingerprint (`rendezvous.etcd_tls.pinned_ca`)."""
    try:
        answer = json.loads(raw)
    except ValueError:
        return None
    ca = answer.get("etcd_ca") if isinstance(answer, dict) else None
    return ca if isinstance(ca, str) and 0 < len(ca) <= 1 << 16 else None


def etcd_credentials_from_answer(status: int, raw: bytes, node_id: str
                                 ) -> EtcdCredentials | None:
    """The etcd user in the coordinator's answer to POST /nodes/<id>/etcd-credentials.

    None when the job runs without etcd authentication (409 `etcd_auth_off`); raises
    CredentialsRefused, with the answer, for anything else that is not usable credentials.
    """
    from rendezvous.etcd_auth import EtcdCredentials

    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    error = answer.get("error") if isinstance(answer, dict) else None
    if status == 409 and isinstance(error, dict) and error.get("code") == "etcd_auth_off":
        return None
    if status != 200 or not isinstance(answer, dict):
        raise CredentialsRefused(f"the coordinator refused etcd credentials for node {node_id} "
                                 f"(HTTP {status}: {raw[:300].decode(errors='replace')})")
    try:
        return EtcdCredentials(answer.get("user"), answer.get("password"))  # type: ignore[arg-type]
    except ValueError as exc:
        raise CredentialsRefused(f"the coordinator sent unusable etcd credentials for node "
                                 f"{node_id}: {exc}") from None
