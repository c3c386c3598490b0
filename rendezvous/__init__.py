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
)

if TYPE_CHECKING:
    from rendezvous.embedded import EmbeddedEtcd
    from rendezvous.etcd import EtcdBackend
    from rendezvous.etcd_auth import EtcdCredentials
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
                     credentials: EtcdCredentials | None = None) -> RendezvousBackend:
    """Open the backend a URL names: `etcd://host:port`, `http://host:port` or `memory://`.

    Several members of one etcd cluster are given as `etcd://h1:2379,h2:2379,h3:2379`;
    the backend fails over between them. `memory://` gives a fresh private in-process
    store (for tests and single-process runs). etcd credentials come from `credentials`,
    else from HORDE_ETCD_USER / HORDE_ETCD_PASSWORD_FILE (none: no authentication).
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from rendezvous.memory import MemoryBackend

        return MemoryBackend()
    if scheme in ("etcd", "http"):
        from rendezvous.etcd import EtcdBackend
        from rendezvous.etcd_auth import EtcdCredentials as _Credentials

        creds = credentials if credentials is not None else _Credentials.from_env()
        if creds is None:
            return EtcdBackend.from_url(url, timeout=timeout)
        return EtcdBackend.from_url(url, timeout=timeout, user=creds.user,
                                    password=creds.password)
    raise ValueError(
        f"rendezvous URL {url!r} is not supported; expected etcd://HOST:PORT, "
        "etcd://HOST1:PORT1,HOST2:PORT2,... (members of one etcd cluster), "
        "http://HOST:PORT or memory://"
    )
