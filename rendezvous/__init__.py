"""Membership for Horde: a key-value backend with leases, and the logic above it.

The backends load on first use (`rendezvous.EtcdBackend` pulls in the HTTP client),
so importing this package stays cheap for code that only needs the errors or keys.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rendezvous.backend import KeyValue, RendezvousBackend
from rendezvous.errors import (
    BlacklistedError,
    HordeError,
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousPermissionError,
    RendezvousTimeoutError,
    RendezvousTLSError,
)

if TYPE_CHECKING:
    from rendezvous.embedded import EmbeddedEtcd
    from rendezvous.etcd import EtcdBackend
    from rendezvous.etcd_auth import EtcdCredentials
    from rendezvous.etcd_tls import EtcdTLS
    from rendezvous.memory import MemoryBackend

__all__ = [
    "BlacklistedError",
    "EmbeddedEtcd",
    "EtcdBackend",
    "RendezvousPermissionError",
    "HordeError",
    "KeyValue",
    "MemoryBackend",
    "RendezvousBackend",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousTimeoutError",
    "RendezvousTLSError",
    "backend_from_url",
]

_LAZY = {
    "EmbeddedEtcd": "rendezvous.embedded",
    "EtcdBackend": "rendezvous.etcd",
    "MemoryBackend": "rendezvous.memory",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def backend_from_url(url: str, timeout: float = 5.0,
                     credentials: EtcdCredentials | None = None,
                     tls: EtcdTLS | None = None) -> RendezvousBackend:
    """Open the backend a URL names: `etcd://host:port`, `http://host:port`,
    `https://host:port` (TLS) or `memory://`.

    Several members of one etcd cluster are given as `etcd://h1:2379,h2:2379,h3:2379`
    (or `https://...`); the backend fails over between them. `memory://` gives a fresh
    private in-process store (for tests and single-process runs). etcd credentials come
    from `credentials`, else from HORDE_ETCD_USER / HORDE_ETCD_PASSWORD_FILE (none: no
    authentication); TLS settings for https:// from `tls`, else from HORDE_ETCD_CACERT /
    HORDE_ETCD_CERT / HORDE_ETCD_KEY (none: the system's CAs). This is the one place
    those variables are read.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from rendezvous.memory import MemoryBackend

        return MemoryBackend()
    if scheme in ("etcd", "http", "https"):
        from rendezvous.etcd import EtcdBackend
        from rendezvous.etcd_auth import EtcdCredentials as _Credentials
        from rendezvous.etcd_tls import EtcdTLS as _TLS

        creds = credentials if credentials is not None else _Credentials.from_env()
        settings = tls if tls is not None else _TLS.from_env()
        if creds is None:
            return EtcdBackend.from_url(url, timeout=timeout, tls=settings)
        return EtcdBackend.from_url(url, timeout=timeout, user=creds.user,
                                    password=creds.password, tls=settings)
    raise ValueError(
        f"rendezvous URL {url!r} is not supported; expected etcd://HOST:PORT, "
        "etcd://HOST1:PORT1,HOST2:PORT2,... (members of one etcd cluster), "
        "https://HOST:PORT[,...] (etcd over TLS), http://HOST:PORT or memory://"
    )
