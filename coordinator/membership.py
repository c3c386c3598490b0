"""What the coordinator reads from (and writes to) the rendezvous.

`RendezvousView` reads a job's keys in one request and caches the result briefly, so a
busy status page costs etcd one read per second at most; `RendezvousWatcher` polls it in
the background and writes what changed (new generations with their joins and
departures, new blacklist entries) into the ledger's timeline. Evictions go through
`rendezvous.agent.blacklist_node`, the same call the training leader uses, so the leader
drops the node at its next generation and keeps it out for the cooldown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rendezvous import records
from rendezvous.agent import blacklist_node, parse_control
from rendezvous.backend import RendezvousBackend
from rendezvous.errors import RendezvousError
from rendezvous.generation import BlacklistEntry, Generation, JobStatus, NodeInfo
from rendezvous.keys import JobKeys

logger = logging.getLogger(__name__)

ALIVE, WAITING, EVICTED, GONE, UNKNOWN = "alive", "waiting", "evicted", "gone", "unknown"
ERROR_BACKOFF = 5.0  # seconds before an unreachable rendezvous is asked again


@dataclass(frozen=True)
class MembershipSnapshot:
    """A job's membership at one moment, as the rendezvous holds it."""

    job: str
    taken_at: float
    generation: Generation | None = None
    registered: dict[str, NodeInfo] = field(default_factory=dict)
    blacklist: dict[str, BlacklistEntry] = field(default_factory=dict)
    leaving: frozenset[str] = frozenset()
    leader: str | None = None
    status: JobStatus | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def state_of(self, node_id: str, wall_now: float) -> str:
        """alive (in the current generation), waiting (registered, not admitted yet),
        evicted (an active blacklist entry), gone (none of these) or unknown (no data)."""
        if not self.ok:
            return UNKNOWN
        entry = self.blacklist.get(node_id)
        if entry is not None and entry.active(wall_now):
            return EVICTED
        in_generation = self.generation is not None and node_id in self.generation.node_ids
        if node_id in self.registered and node_id not in self.leaving:
            return ALIVE if in_generation else WAITING
        return GONE


class RendezvousView:
    """Cached reads of one job's membership, and the operator's blacklist writes."""

    def __init__(self, backend: RendezvousBackend, prefix: str, job: str,
                 max_age: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.prefix = prefix
        self.job = job
        self.keys = JobKeys(prefix, job)
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot: MembershipSnapshot | None = None
        self._failing = False

    def keys_for(self, job: str | None) -> JobKeys:
        return self.keys if job is None or job == self.job else JobKeys(self.prefix, job)

    def snapshot(self, max_age: float | None = None) -> MembershipSnapshot:
        """The membership, at most `max_age` seconds old (an error is kept for a while)."""
        max_age = self.max_age if max_age is None else max_age
        with self._lock:
            now = self._clock()
            snap = self._snapshot
            if snap is not None:
                age = now - snap.taken_at
                if age <= max_age or (not snap.ok and age <= ERROR_BACKOFF and max_age > 0):
                    return snap
            snap = self._read(now)
            self._snapshot = snap
            return snap

    def _read(self, now: float) -> MembershipSnapshot:
        keys = self.keys
        try:
            kvs, _revision = self.backend.get_prefix(keys.root)
        except RendezvousError as exc:
            # Said once when it starts failing, not at every poll while it stays down.
            log = logger.debug if self._failing else logger.warning
            log("job %s: cannot read the rendezvous: %s", self.job, exc)
            self._failing = True
            return MembershipSnapshot(self.job, now, error=str(exc))
        if self._failing:
            logger.warning("job %s: the rendezvous answers again", self.job)
            self._failing = False
        control = parse_control([kv for kv in kvs if kv.key.startswith(keys.control)], keys)
        registered: dict[str, NodeInfo] = {}
        blacklist: dict[str, BlacklistEntry] = {}
        leaving: set[str] = set()
        for kv in kvs:
            # Invalid values are logged once (rendezvous.records) and skipped.
            if kv.key.startswith(keys.nodes):
                # Shown as registered even without a lease: only the leader admits, and
                # it never admits one (rendezvous.agent.registration).
                info = records.read_record(kv, records.parse_node_info)
                if info is not None and kv.key == keys.node(info.node_id):
                    registered[info.node_id] = info
            elif kv.key.startswith(keys.blacklist):
                entry = records.read_record(kv, records.parse_blacklist_entry)
                if entry is not None:
                    blacklist[entry.node_id] = entry
            elif kv.key.startswith(keys.leaving):
                node_id = records.node_id_of(kv.key, keys.leaving)
                if node_id is not None:
                    leaving.add(node_id)
        return MembershipSnapshot(self.job, now, control.generation, registered, blacklist,
                                  frozenset(leaving), control.leader, control.status)

    def invalidate(self) -> None:
        with self._lock:
            self._snapshot = None

    def evict(self, node_id: str, reason: str, cooldown_seconds: float | None,
              job: str | None = None) -> BlacklistEntry:
        """Blacklist `node_id` (for `cooldown_seconds`, or for good when None)."""
        cooldown = None if cooldown_seconds is None else (cooldown_seconds, cooldown_seconds)
        entry = blacklist_node(self.backend, self.keys_for(job), node_id, reason, cooldown)
        self.invalidate()
        return entry

    def pardon(self, node_id: str, job: str | None = None) -> bool:
        """Remove the blacklist entry of `node_id`; False when there was none."""
        existed = self.backend.delete(self.keys_for(job).blacklisted(node_id))
        self.invalidate()
        return existed

    def blacklist(self, job: str | None = None) -> list[BlacklistEntry]:
        if job is None or job == self.job:
            snap = self.snapshot()
            if snap.error is not None:
                raise RendezvousError(snap.error)
            return sorted(snap.blacklist.values(), key=lambda e: e.node_id)
        keys = self.keys_for(job)
        kvs, _ = self.backend.get_prefix(keys.blacklist)
        entries = (records.read_record(kv, records.parse_blacklist_entry) for kv in kvs)
        return sorted((e for e in entries if e is not None), key=lambda e: e.node_id)


class RendezvousWatcher:
    """Polls the view and writes membership changes into the ledger's timeline."""

    def __init__(self, view: RendezvousView, record: Callable[[MembershipSnapshot], None],
                 interval: float) -> None:
        self.view = view
        self.record = record
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> MembershipSnapshot:
        snap = self.view.snapshot(max_age=0)
        if snap.ok:
            self.record(snap)
        return snap

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the watcher must outlive a bad poll
                logger.exception("job %s: rendezvous watcher poll failed", self.view.job)
            self._stop.wait(self.interval)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"horde-coordinator-watch-{self.view.job}")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
