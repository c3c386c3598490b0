"""The rendezvous backend interface: a small key-value store with leases.

Everything membership does (registration, leader election, generations, the
blacklist) is logic above these few calls, so it runs unchanged on a real etcd
(`EtcdBackend`) and on an in-process store for unit tests (`MemoryBackend`).
Compare-and-swap uses etcd's `mod_revision` as a fencing token.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class KeyValue:
    """One stored key with the metadata the membership logic relies on."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


class RendezvousBackend(abc.ABC):
    """A linearizable key-value store with TTL leases and change notification.

    Keys are `str`, values are `bytes`. Revisions grow with every change to the
    store (as etcd's do); `0` as an expected revision means "the key is absent".
    Failures to reach the store raise `RendezvousConnectionError`.
    """

    @abc.abstractmethod
    def get(self, key: str) -> KeyValue | None:
        """Return the key, or None when it does not exist."""

    @abc.abstractmethod
    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Return every key starting with `prefix`, sorted by key, and the store revision."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write the key unconditionally; returns the new store revision."""

    @abc.abstractmethod
    def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: int = 0
    ) -> bool:
        """Write only if the key's mod_revision equals `expected_mod_revision` (0: absent)."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete the key; returns whether it existed."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with `prefix`; returns how many were deleted."""

    @abc.abstractmethod
    def grant_lease(self, ttl: int) -> int:
        """Create a lease of `ttl` whole seconds and return its id."""

    @abc.abstractmethod
    def refresh_lease(self, lease: int) -> bool:
        """Keep the lease alive; returns False when it has already expired."""

    @abc.abstractmethod
    def revoke_lease(self, lease: int) -> None:
        """End the lease now; every key bound to it is deleted."""

    @abc.abstractmethod
    def wait_for_change(self, prefix: str, after_revision: int, timeout: float) -> bool:
        """Block until a key under `prefix` changes after `after_revision`, or `timeout` s.

        Returns True when a change was seen, False on timeout. Used instead of
        polling so a waiting node costs the store nothing while nothing happens.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""
