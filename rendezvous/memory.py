"""An in-process `RendezvousBackend` with etcd's semantics, for unit tests of logic.

It mimics what the membership logic relies on: one global revision bumped by each
mutation, `mod_revision`/`create_revision` per key, TTL leases that delete their keys
when they expire, and change notification. The lease clock can be injected, so tests
expire leases by advancing a fake clock instead of sleeping.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rendezvous.backend import KeyValue, RendezvousBackend
from rendezvous.errors import RendezvousError

logger = logging.getLogger(__name__)

# How often a blocked `wait_for_change` wakes to expire leases (seconds, real time).
POLL_INTERVAL = 0.05
# How many change events are kept for `wait_for_change`; older ones are "compacted".
HISTORY_LIMIT = 100_000


@dataclass
class _Lease:
    ttl: int
    deadline: float
    keys: set[str] = field(default_factory=set)


class MemoryBackend(RendezvousBackend):
    """Thread-safe in-memory key-value store with leases and revisions (as etcd's).

    `clock` drives lease expiry only; `wait_for_change` timeouts are real time.
    `ops` counts the calls made, per operation name.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._kvs: dict[str, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._revision = 1  # etcd starts at 1 with an empty store
        # (revision, key) for every change, so waiters can tell what changed after when.
        self._history: collections.deque[tuple[int, str]] = collections.deque()
        self._compacted = 0  # changes at or below this revision are no longer recorded
        self.ops: dict[str, int] = collections.defaultdict(int)

    # -- internals (call with the lock held) ---------------------------------------

    def _count(self, op: str) -> None:
        self.ops[op] += 1

    def _record(self, key: str) -> None:
        self._history.append((self._revision, key))
        while len(self._history) > HISTORY_LIMIT:
            self._compacted = self._history.popleft()[0]

    def _bump(self) -> int:
        self._revision += 1
        self._cond.notify_all()
        return self._revision

    def _unbind(self, kv: KeyValue) -> None:
        if kv.lease and kv.lease in self._leases:
            self._leases[kv.lease].keys.discard(kv.key)

    def _remove_keys(self, keys: list[str]) -> int:
        """Delete `keys` in one revision (as one etcd transaction); returns how many."""
        present = [k for k in keys if k in self._kvs]
        if not present:
            return 0
        self._bump()
        for key in present:
            self._unbind(self._kvs.pop(key))
            self._record(key)
        return len(present)

    def _expire(self) -> None:
        now = self._clock()
        expired = [lid for lid, lease in self._leases.items() if lease.deadline <= now]
        for lid in expired:
            lease = self._leases.pop(lid)
            logger.debug("lease %d expired, deleting %d keys", lid, len(lease.keys))
            self._remove_keys(sorted(lease.keys))

    def _write(self, key: str, value: bytes, lease: int) -> int:
        if lease and lease not in self._leases:
            raise RendezvousError(f"requested lease not found: lease {lease} expired or unknown")
        old = self._kvs.get(key)
        if old is not None:
            self._unbind(old)
        revision = self._bump()
        create_revision = old.create_revision if old is not None else revision
        self._kvs[key] = KeyValue(key, bytes(value), revision, create_revision, lease)
        if lease:
            self._leases[lease].keys.add(key)
        self._record(key)
        return revision

    # -- RendezvousBackend ----------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        """Return the key, or None when it does not exist."""
        with self._cond:
            self._count("get")
            self._expire()
            return self._kvs.get(key)

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Return every key starting with `prefix`, sorted by key, and the store revision."""
        with self._cond:
            self._count("get_prefix")
            self._expire()
            kvs = sorted(
                (kv for key, kv in self._kvs.items() if key.startswith(prefix)),
                key=lambda kv: kv.key,
            )
            return kvs, self._revision

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write the key unconditionally; returns the new store revision."""
        with self._cond:
            self._count("put")
            self._expire()
            return self._write(key, value, lease)

    def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: int = 0
    ) -> bool:
        """Write only if the key's mod_revision equals `expected_mod_revision` (0: absent)."""
        with self._cond:
            self._count("compare_and_swap")
            self._expire()
            old = self._kvs.get(key)
            current = old.mod_revision if old is not None else 0
            if current != expected_mod_revision:
                return False
            self._write(key, value, lease)
            return True

    def delete(self, key: str) -> bool:
        """Delete the key; returns whether it existed."""
        with self._cond:
            self._count("delete")
            self._expire()
            return self._remove_keys([key]) == 1

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with `prefix`; returns how many were deleted."""
        with self._cond:
            self._count("delete_prefix")
            self._expire()
            return self._remove_keys(sorted(k for k in self._kvs if k.startswith(prefix)))

    def grant_lease(self, ttl: int) -> int:
        """Create a lease of `ttl` whole seconds and return its id."""
        if ttl < 1:
            raise ValueError(f"lease ttl {ttl!r} must be a whole number of seconds >= 1")
        with self._cond:
            self._count("grant_lease")
            self._expire()
            lease_id = next(self._lease_ids)
            self._leases[lease_id] = _Lease(int(ttl), self._clock() + ttl)
            return lease_id

    def refresh_lease(self, lease: int) -> bool:
        """Keep the lease alive; returns False when it has already expired."""
        with self._cond:
            self._count("refresh_lease")
            self._expire()
            entry = self._leases.get(lease)
            if entry is None:
                return False
            entry.deadline = self._clock() + entry.ttl
            return True

    def revoke_lease(self, lease: int) -> None:
        """End the lease now; every key bound to it is deleted (unknown leases are ignored)."""
        with self._cond:
            self._count("revoke_lease")
            self._expire()
            entry = self._leases.pop(lease, None)
            if entry is not None:
                self._remove_keys(sorted(entry.keys))

    def wait_for_change(self, prefix: str, after_revision: int, timeout: float) -> bool:
        """Block until a key under `prefix` changes after `after_revision`, or `timeout` s.

        Wakes every `POLL_INTERVAL` to expire leases, so a lease running out while
        nobody else touches the store still counts as a change.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._count("wait_for_change")
            while True:
                self._expire()
                if self._changed(prefix, after_revision):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, POLL_INTERVAL))

    def _changed(self, prefix: str, after_revision: int) -> bool:
        if after_revision < self._compacted:
            return True  # history is gone: report a change, as etcd's compaction does
        for revision, key in reversed(self._history):
            if revision <= after_revision:
                return False
            if key.startswith(prefix):
                return True
        return False

    # -- helpers for tests and benchmarks ---------------------------------------------

    @property
    def revision(self) -> int:
        """The current store revision."""
        with self._cond:
            return self._revision

    def expire_leases(self) -> None:
        """Expire leases whose deadline passed on the injected clock, and wake waiters."""
        with self._cond:
            self._expire()
            self._cond.notify_all()
