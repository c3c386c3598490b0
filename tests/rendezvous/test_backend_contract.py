"""One contract for every `RendezvousBackend`, run on `MemoryBackend` and on a real etcd.

The membership logic is tested on the in-memory store only; this suite is what makes
that trustworthy: both stores must agree on revisions, CAS, leases and notification.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rendezvous import (
    EtcdBackend,
    KeyValue,
    MemoryBackend,
    RendezvousBackend,
    RendezvousConnectionError,
    RendezvousError,
)
from rendezvous import memory as memory_module

# Waits for a lease to expire: instant on the fake clock, TTL seconds on a real etcd.
lease_wait = pytest.mark.lease_wait


class RealTime:
    """Time as etcd sees it: leases expire on the server's clock, so tests sleep."""

    ttl = 2  # etcd's minimum lease TTL with default raft timing

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)

    def let_lease_expire(self) -> None:
        """Nothing to do: the server expires leases by itself."""

    def wait_deleted(self, backend: RendezvousBackend, key: str) -> None:
        # etcd checks for expired leases every 500 ms, so allow TTL plus a margin.
        deadline = time.monotonic() + self.ttl + 5.0
        while backend.get(key) is not None:
            assert time.monotonic() < deadline, f"{key} outlived its lease"
            time.sleep(0.1)


class FakeTime:
    """An injectable clock for `MemoryBackend`: leases expire when the test says so."""

    ttl = 2

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def let_lease_expire(self) -> None:
        self.advance(self.ttl + 0.001)

    def wait_deleted(self, backend: RendezvousBackend, key: str) -> None:
        self.let_lease_expire()
        assert backend.get(key) is None


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `fn` in a daemon thread; its result (or exception) lands in the dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        start = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as exc:  # handed to the test thread
            out["error"] = exc
        out["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


class BackendContract:
    """Behaviour every backend must show. Subclasses provide `backend` and `timeline`."""

    # -- plain key-value --------------------------------------------------------------

    def test_get_missing_key_is_none(self, backend: RendezvousBackend, key_prefix: str) -> None:
        assert backend.get(key_prefix + "missing") is None

    def test_put_then_get(self, backend: RendezvousBackend, key_prefix: str) -> None:
        key = key_prefix + "a"
        revision = backend.put(key, b"hello")
        kv = backend.get(key)
        assert kv == KeyValue(key, b"hello", revision, revision, 0)

    def test_overwrite_keeps_create_revision(
        self, backend: RendezvousBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "a"
        first = backend.put(key, b"1")
        second = backend.put(key, b"2")
        assert second > first
        kv = backend.get(key)
        assert kv is not None
        assert (kv.value, kv.mod_revision, kv.create_revision) == (b"2", second, first)

    def test_binary_values_and_unicode_keys(
        self, backend: RendezvousBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "nœud-é"
        value = bytes(range(256))
        backend.put(key, value)
        kv = backend.get(key)
        assert kv is not None and kv.key == key and kv.value == value
        assert [kv.key for kv in backend.get_prefix(key_prefix)[0]] == [key]

    def test_empty_value(self, backend: RendezvousBackend, key_prefix: str) -> None:
        backend.put(key_prefix + "e", b"")
        kv = backend.get(key_prefix + "e")
        assert kv is not None and kv.value == b""

    def test_delete(self, backend: RendezvousBackend, key_prefix: str) -> None:
        key = key_prefix + "a"
        backend.put(key, b"1")
        assert backend.delete(key) is True
        assert backend.get(key) is None
        assert backend.delete(key) is False

    def test_get_prefix_sorted_with_revision(
        self, backend: RendezvousBackend, key_prefix: str
    ) -> None:
        for name in ("c", "a", "b/x", "b"):
            last = backend.put(key_prefix + "dir/" + name, name.encode())
        backend.put(key_prefix + "dirt", b"outside")  # shares the text but not the prefix
        kvs, revision = backend.get_prefix(key_prefix + "dir/")
        assert [kv.key for kv in kvs] == [key_prefix + "dir/" + n for n in ("a", "b", "b/x", "c")]
        assert [kv.value for kv in kvs] == [b"a", b"b", b"b/x", b"c"]
        assert revision >= last + 1  # the outside put came after
        assert backend.get_prefix(key_prefix + "none/") == ([], revision)

    def test_delete_prefix(self, backend: RendezvousBackend, key_prefix: str) -> None:
        for name in ("a", "b", "c"):
            backend.put(key_prefix + "d/" + name, b"x")
        backend.put(key_prefix + "keep", b"x")
        assert backend.delete_prefix(key_prefix + "d/") == 3
        assert backend.delete_prefix(key_prefix + "d/") == 0
        assert [kv.key for kv in backend.get_prefix(key_prefix)[0]] == [key_prefix + "keep"]

    # -- revisions and compare-and-swap ---------------------------------------------------

    def test_revisions_grow_with_every_change(
        self, backend: RendezvousBackend, key_prefix: str
    ) -> None:
        _, start = backend.get_prefix(key_prefix)
        r1 = backend.put(key_prefix + "a", b"1")
        r2 = backend.put(key_prefix + "b", b"1")
        assert start < r1 < r2
        backend.delete(key_prefix + "a")
        _, after_delete = backend.get_prefix(key_prefix)
        assert after_delete > r2
        assert backend.put(key_prefix + "a", b"2") > after_delete

    def test_cas_creates_only_if_absent(self, backend: RendezvousBackend, key_prefix: str) -> None:
        key = key_prefix + "leader"
        assert backend.compare_and_swap(key, 0, b"first") is True
        assert backend.compare_and_swap(key, 0, b"second") is False
        kv = backend.get(key)
        assert kv is not None and kv.value == b"first"

    def test_cas_with_current_revision_succeeds(
        self, backend: RendezvousBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "generation"
        revision = backend.put(key, b"g1")
        assert backend.compare_and_swap(key, revision, b"g2") is True
        kv = backend.get(key)
        assert kv is not None
        assert kv.value == b"g2" and kv.mod_revision > revision
        assert kv.create_revision == revision

    def test_cas_with_stale_revision_fails(
        self, backend: RendezvousBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "generation"
        stale = backend.put(key, b"g1")
        current = backend.put(key, b"g2")
        _, before = backend.get_prefix(key_prefix)
        assert backend.compare_and_swap(key, stale, b"g3") is False
        assert backend.compare_and_swap(key_prefix + "absent", stale, b"x") is False
        kv = backend.get(key)
        assert kv is not None and (kv.value, kv.mod_revision) == (b"g2", current)
        assert backend.get(key_prefix + "absent") is None
        assert backend.get_prefix(key_prefix)[1] == before  # a failed CAS changes nothing

    def test_concurrent_cas_loses_no_update(
        self, backend: RendezvousBackend, key_prefix: str
    ) -> None:
        key = key_prefix + "counter"
        backend.put(key, b"0")

        def increment(times: int) -> None:
            for _ in range(times):
                while True:
                    kv = backend.get(key)
                    assert kv is not None
                    if backend.compare_and_swap(
                        key, kv.mod_revision, str(int(kv.value) + 1).encode()
                    ):
                        break

        threads = [in_thread(lambda: increment(10)) for _ in range(4)]
        for thread, out in threads:
            thread.join(30)
            assert "error" not in out, out.get("error")
        kv = backend.get(key)
        assert kv is not None and kv.value == b"40"

    # -- leases -----------------------------------------------------------------------------

    def test_grant_lease_rejects_non_positive_ttl(self, backend: RendezvousBackend) -> None:
        with pytest.raises(ValueError, match="ttl"):
            backend.grant_lease(0)

    def test_key_carries_its_lease(self, backend: RendezvousBackend, key_prefix: str) -> None:
        lease = backend.grant_lease(5)
        try:
            backend.put(key_prefix + "node", b"x", lease=lease)
            kv = backend.get(key_prefix + "node")
            assert kv is not None and kv.lease == lease
            assert backend.grant_lease(5) != lease
        finally:
            backend.revoke_lease(lease)

    @lease_wait
    def test_lease_expiry_deletes_its_keys(
        self, backend: RendezvousBackend, key_prefix: str, timeline: Any
    ) -> None:
        lease = backend.grant_lease(timeline.ttl)
        backend.put(key_prefix + "node/1", b"x", lease=lease)
        backend.compare_and_swap(key_prefix + "node/2", 0, b"y", lease=lease)
        backend.put(key_prefix + "static", b"z")
        timeline.wait_deleted(backend, key_prefix + "node/1")
        assert [kv.key for kv in backend.get_prefix(key_prefix)[0]] == [key_prefix + "static"]

    @lease_wait
    def test_refresh_keeps_lease_alive(
        self, backend: RendezvousBackend, key_prefix: str, timeline: Any
    ) -> None:
        lease = backend.grant_lease(timeline.ttl)
        try:
            backend.put(key_prefix + "node", b"x", lease=lease)
            step = timeline.ttl / 4
            for _ in range(6):  # 1.5 TTL in all, never more than a quarter TTL unrefreshed
                timeline.advance(step)
                assert backend.refresh_lease(lease) is True
            assert backend.get(key_prefix + "node") is not None
        finally:
            backend.revoke_lease(lease)

    def test_revoke_deletes_keys_now(self, backend: RendezvousBackend, key_prefix: str) -> None:
        lease = backend.grant_lease(30)
        backend.put(key_prefix + "a", b"x", lease=lease)
        backend.put(key_prefix + "b", b"x", lease=lease)
        backend.revoke_lease(lease)
        assert backend.get_prefix(key_prefix)[0] == []
        assert backend.refresh_lease(lease) is False
        backend.revoke_lease(lease)  # a second revoke is harmless

    @lease_wait
    def test_refresh_of_expired_lease_is_false(
        self, backend: RendezvousBackend, key_prefix: str, timeline: Any
    ) -> None:
        lease = backend.grant_lease(timeline.ttl)
        backend.put(key_prefix + "node", b"x", lease=lease)
        timeline.wait_deleted(backend, key_prefix + "node")
        assert backend.refresh_lease(lease) is False

    def test_refresh_of_unknown_lease_is_false(self, backend: RendezvousBackend) -> None:
        assert backend.refresh_lease(987654321) is False

    @lease_wait
    def test_write_with_expired_lease_raises(
        self, backend: RendezvousBackend, key_prefix: str, timeline: Any
    ) -> None:
        lease = backend.grant_lease(timeline.ttl)
        backend.put(key_prefix + "node", b"x", lease=lease)
        timeline.wait_deleted(backend, key_prefix + "node")
        with pytest.raises(RendezvousError, match="lease not found") as info:
            backend.put(key_prefix + "node", b"again", lease=lease)
        assert not isinstance(info.value, RendezvousConnectionError)
        with pytest.raises(RendezvousError, match="lease not found"):
            backend.compare_and_swap(key_prefix + "node", 0, b"again", lease=lease)
        assert backend.get(key_prefix + "node") is None

    def test_write_with_unknown_lease_raises(
        self, backend: RendezvousBackend, key_prefix: str
    ) -> None:
        with pytest.raises(RendezvousError, match="lease not found"):
            backend.put(key_prefix + "node", b"x", lease=123456789)
        assert backend.get(key_prefix + "node") is None

    # -- change notification -------------------------------------------------------------

    def test_wait_times_out_without_change(
        self, backend: RendezvousBackend, key_prefix: str
    ) -> None:
        _, revision = backend.get_prefix(key_prefix)
        start = time.monotonic()
        assert backend.wait_for_change(key_prefix, revision, 0.3) is False
        assert 0.25 <= time.monotonic() - start < 2.0

    def test_wait_wakes_on_put(self, backend: RendezvousBackend, key_prefix: str) -> None:
        _, revision = backend.get_prefix(key_prefix)
        thread, out = in_thread(lambda: backend.wait_for_change(key_prefix, revision, 10.0))
        time.sleep(0.2)
        assert thread.is_alive()
        backend.put(key_prefix + "x", b"1")
        thread.join(5)
        assert out.get("result") is True, out
        assert out["elapsed"] < 3.0

    def test_wait_wakes_on_delete(self, backend: RendezvousBackend, key_prefix: str) -> None:
        revision = backend.put(key_prefix + "x", b"1")
        thread, out = in_thread(lambda: backend.wait_for_change(key_prefix, revision, 10.0))
        time.sleep(0.2)
        assert thread.is_alive()
        backend.delete(key_prefix + "x")
        thread.join(5)
        assert out.get("result") is True, out

    def test_wait_ignores_other_prefixes(self, backend: RendezvousBackend, key_prefix: str) -> None:
        _, revision = backend.get_prefix(key_prefix)
        thread, out = in_thread(lambda: backend.wait_for_change(key_prefix + "a/", revision, 0.6))
        time.sleep(0.1)
        backend.put(key_prefix + "b/x", b"1")
        backend.put(key_prefix + "a", b"1")  # not under "a/"
        thread.join(5)
        assert out.get("result") is False, out

    def test_wait_sees_change_already_made(
        self, backend: RendezvousBackend, key_prefix: str
    ) -> None:
        _, revision = backend.get_prefix(key_prefix)
        backend.put(key_prefix + "x", b"1")
        start = time.monotonic()
        assert backend.wait_for_change(key_prefix, revision, 5.0) is True
        assert time.monotonic() - start < 1.0
        _, now = backend.get_prefix(key_prefix)
        assert backend.wait_for_change(key_prefix, now, 0.1) is False

    @lease_wait
    def test_wait_wakes_on_lease_expiry(
        self, backend: RendezvousBackend, key_prefix: str, timeline: Any
    ) -> None:
        lease = backend.grant_lease(timeline.ttl)
        revision = backend.put(key_prefix + "node", b"x", lease=lease)
        thread, out = in_thread(lambda: backend.wait_for_change(key_prefix, revision, 15.0))
        time.sleep(0.2)
        assert thread.is_alive()
        timeline.let_lease_expire()
        thread.join(timeline.ttl + 6)
        assert out.get("result") is True, out
        assert backend.get(key_prefix + "node") is None

    def test_ops_are_counted(self, backend: Any, key_prefix: str) -> None:
        before = dict(backend.ops)
        backend.put(key_prefix + "x", b"1")
        backend.get(key_prefix + "x")
        backend.get(key_prefix + "x")
        assert backend.ops["put"] == before.get("put", 0) + 1
        assert backend.ops["get"] == before.get("get", 0) + 2


class TestMemoryBackend(BackendContract):
    """The contract on the in-process store, with a fake lease clock (no sleeping)."""

    @pytest.fixture
    def timeline(self) -> FakeTime:
        return FakeTime()

    @pytest.fixture
    def backend(self, timeline: FakeTime) -> Iterator[MemoryBackend]:
        store = MemoryBackend(clock=timeline)
        yield store
        store.close()

    def test_lease_lives_until_exactly_its_ttl(
        self, backend: MemoryBackend, timeline: FakeTime, key_prefix: str
    ) -> None:
        lease = backend.grant_lease(3)
        backend.put(key_prefix + "n", b"x", lease=lease)
        timeline.advance(2.999)
        assert backend.get(key_prefix + "n") is not None
        timeline.advance(0.001)
        assert backend.get(key_prefix + "n") is None

    def test_lease_expiry_is_one_revision(
        self, backend: MemoryBackend, timeline: FakeTime, key_prefix: str
    ) -> None:
        lease = backend.grant_lease(1)
        backend.put(key_prefix + "a", b"x", lease=lease)
        backend.put(key_prefix + "b", b"x", lease=lease)
        before = backend.revision
        timeline.advance(1)
        assert backend.get_prefix(key_prefix) == ([], before + 1)

    def test_wait_reports_change_when_history_is_gone(
        self, backend: MemoryBackend, key_prefix: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(memory_module, "HISTORY_LIMIT", 3)
        _, revision = backend.get_prefix(key_prefix)
        backend.put(key_prefix + "x", b"1")
        for i in range(5):
            backend.put(f"/elsewhere/{i}", b"1")
        assert backend.wait_for_change(key_prefix + "never/", revision, 0.1) is True

    def test_wait_counts_as_one_op(self, backend: MemoryBackend, key_prefix: str) -> None:
        backend.wait_for_change(key_prefix, backend.revision, 0.12)
        assert backend.ops["wait_for_change"] == 1


class TestEtcdBackend(BackendContract):
    """The contract on a real etcd server (the session's embedded one)."""

    @pytest.fixture
    def timeline(self) -> RealTime:
        return RealTime()

    @pytest.fixture
    def backend(self, etcd_server: Any, key_prefix: str) -> Iterator[EtcdBackend]:
        store = EtcdBackend.from_url(etcd_server.url)
        yield store
        store.delete_prefix(key_prefix)
        store.delete_prefix("/elsewhere/")
        store.close()

    def test_wait_leaves_no_thread_behind(self, backend: EtcdBackend, key_prefix: str) -> None:
        _, revision = backend.get_prefix(key_prefix)
        before = threading.active_count()
        for _ in range(3):
            assert backend.wait_for_change(key_prefix, revision, 0.1) is False
        assert threading.active_count() == before

    def test_wait_reports_change_when_history_is_compacted(
        self, backend: EtcdBackend, key_prefix: str
    ) -> None:
        old = backend.put(key_prefix + "x", b"1")
        backend.put(key_prefix + "y", b"1")
        now = backend.put(key_prefix + "z", b"1")  # compacting here drops old + 1
        client = backend._client()
        client.post(client.get_url("/kv/compaction"), json={"revision": str(now)})
        assert backend.wait_for_change(key_prefix + "never/", old, 2.0) is True

    def test_backend_is_usable_from_many_threads(
        self, backend: EtcdBackend, key_prefix: str
    ) -> None:
        def work(i: int) -> int:
            for j in range(5):
                backend.put(f"{key_prefix}t{i}/{j}", b"x")
            return len(backend.get_prefix(f"{key_prefix}t{i}/")[0])

        threads = [in_thread(lambda i=i: work(i)) for i in range(8)]
        for thread, out in threads:
            thread.join(30)
            assert out.get("result") == 5, out
