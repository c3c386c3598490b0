"""Stall inspection: what each rank is blocked on, so that peers and horderun can say it.

A rank that waits in a collective longer than the stall-check time logs which ranks have
not submitted that collective and what they do instead, as Horovod's stall inspector
does; past the stall-shutdown time (if set) the collective fails with
`CollectiveStallError`. The side channel: each rank publishes the collective it is
blocked in under its own rendezvous key, bound to its lease, but only once it has waited
half the check time, so a healthy job writes nothing. `horderun` reads the same records.

The waits themselves cost nothing until a wait outlasts its first slice (50 ms): only then
is it entered here. A monitor thread per generation does the rest.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elastic.errors import CollectiveStallError

logger = logging.getLogger(__name__)

_MAX_TEXT = 200


@dataclass(frozen=True)
class Activity:
    """What one rank published: the collective it has been blocked in since `since`
    (seconds since the epoch), in generation `generation`."""

    node_id: str
    rank: int
    generation: int
    what: str
    since: float

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Activity | None:
        """The record, or None when it is not one (peer bytes are data: checked, cut short)."""
        try:
            data = json.loads(raw)
            what = "".join(c if c.isprintable() else "?" for c in str(data["what"]))
            since = float(data["since"])
            if not math.isfinite(since):
                return None
            return cls(str(data["node_id"])[:_MAX_TEXT], int(data["rank"]),
                       int(data["generation"]), what[:_MAX_TEXT], since)
        except (ValueError, KeyError, TypeError, OverflowError):  # int(Infinity): Overflow
            return None


def read_activity(backend: object, prefix: str) -> dict[str, Activity]:
    """Every node's published activity under `prefix` (JobKeys.activity), by node id."""
    kvs, _ = backend.get_prefix(prefix)  # type: ignore[attr-defined]
    records = {}
    for kv in kvs:
        record = Activity.from_json(kv.value)
        if record is not None:
            records[kv.key[len(prefix):]] = record
    return records


def waited(record: Activity, now: float | None = None) -> str:
    """`what` and for how long, as a log line says it."""
    seconds = max(0.0, (time.time() if now is None else now) - record.since)
    return f"waiting in {record.what} for {seconds:.0f} s"


@dataclass
class _Wait:
    what: str | Callable[[], str]
    since: float
    wall: float
    check: bool
    members: tuple[int, ...] | None


class StallInspector:
    """The waits of one rank in one generation, and the thread that watches them.

    `publish(bytes | None)` writes (or clears) this rank's record; `read()` returns every
    node's records; both None without a rendezvous. `check_time <= 0` turns warnings and
    shutdown off (publishing goes on, for horderun). `monitor=False`: no thread; the
    owner calls `inspect(now)` itself.
    """

    def __init__(self, node_id: str, rank: int, size: int, generation: int,
                 check_time: float, shutdown_time: float, collective_timeout: float,
                 publish: Callable[[bytes | None], None] | None = None,
                 read: Callable[[], dict[str, Activity]] | None = None,
                 monitor: bool = True) -> None:
        self.node_id, self.rank, self.size, self.generation = node_id, rank, size, generation
        self.check_time = check_time
        self.shutdown_time = shutdown_time
        self.collective_timeout = collective_timeout
        base = check_time if check_time > 0 else min(60.0, collective_timeout / 2)
        self.publish_after = base / 2
        self.tick = min(1.0, max(0.05, base / 8))
        self._publish = publish
        self._read = read
        self._waits: dict[int, _Wait] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._published: int | None = None
        self._last_warning = float("-inf")
        self.error: CollectiveStallError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="horde-stall", daemon=True)
        if monitor:
            self._thread.start()

    # -- what the waits call --------------------------------------------------------

    def enter(self, what: str | Callable[[], str], since: float, check: bool = True,
              members: Sequence[int] | None = None) -> int:
        """A wait that outlasted its first slice began at `since` (monotonic)."""
        wall = time.time() - (time.monotonic() - since)
        token = next(self._tokens)
        with self._lock:
            self._waits[token] = _Wait(what, since, wall, check,
                                       tuple(members) if members is not None else None)
        return token

    def leave(self, token: int) -> None:
        with self._lock:
            self._waits.pop(token, None)

    def raise_if_failed(self) -> None:
        """Raise (a copy of) the stall error once a stalled collective shut this rank down."""
        if self.error is not None:
            raise CollectiveStallError(str(self.error)) from None

    def close(self) -> None:
        """Stop watching (the generation ends) and clear this rank's record."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(2.0)
        if self._published is not None and self._publish is not None:
            try:
                self._publish(None)
            except Exception:  # noqa: BLE001 - the record goes with the lease anyway
                logger.debug("could not clear the activity record", exc_info=True)

    # -- the monitor ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.inspect(time.monotonic())
            except Exception:  # noqa: BLE001 - inspection must never break training
                logger.debug("stall inspection failed", exc_info=True)

    def inspect(self, now: float) -> None:
        """One pass: publish or clear this rank's record, warn, shut down when due."""
        with self._lock:
            waits = list(self._waits.items())
        oldest = min(waits, key=lambda item: item[1].since, default=None)
        if oldest is not None and now - oldest[1].since >= self.publish_after:
            if self._published != oldest[0]:
                self._put(oldest[1])
                self._published = oldest[0]
        elif self._published is not None:
            if self._publish is not None:
                self._publish(None)
            self._published = None
        checked = [w for _t, w in waits if w.check]
        if self.check_time <= 0 or not checked or self.error is not None:
            return
        stalled = min(checked, key=lambda w: w.since)
        lag = now - stalled.since
        shut = 0 < self.shutdown_time <= lag
        if lag < self.check_time or (now - self._last_warning < self.check_time and not shut):
            return
        self._last_warning = now
        message = self._describe(stalled, lag)
        if shut:
            text = (f"{message} That is longer than the stall-shutdown time "
                    f"({self.shutdown_time:g} s, HOROVOD_STALL_SHUTDOWN_TIME_SECONDS): this "
                    "rank's collectives are shut down.")
            logger.error("%s", text)
            self.error = CollectiveStallError(text)
        else:
            logger.warning("%s Unless they do, this waits until the collective timeout "
                           "(%g s).", message, self.collective_timeout)

    def _put(self, wait: _Wait) -> None:
        if self._publish is None:
            return
        record = Activity(self.node_id, self.rank, self.generation, _text(wait.what),
                          wait.wall)
        self._publish(record.to_json())

    def _describe(self, wait: _Wait, lag: float) -> str:
        """Horovod's stall warning, with what each missing rank does instead."""
        what = _text(wait.what)
        records: dict[int, Activity] = {}
        if self._read is not None:
            try:
                records = {r.rank: r for r in self._read().values()
                           if r.generation == self.generation}
            except Exception as exc:  # noqa: BLE001 - say what we know without them
                logger.debug("could not read the other ranks' activity: %s", exc)
        now = time.time()
        members = wait.members if wait.members is not None else range(self.size)
        missing = []
        for rank in members:
            if rank == self.rank:
                continue
            record = records.get(rank)
            if record is None:
                missing.append(f"rank {rank} (not in a collective: still computing, hung "
                               "outside collectives, or finished)")
            elif record.what != what:
                missing.append(f"rank {rank} ({waited(record, now)})")
        who = ("ranks that have not submitted it: " + "; ".join(missing) if missing else
               "every other rank waits in it too (a peer link may be down)")
        return (f"Stall: rank {self.rank} has waited {lag:.0f} s in {what} (generation "
                f"{self.generation}); {who}. The ranks must submit the same collectives in "
                "the same order (check e.g. that every rank runs as many batches).")


def _text(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


__all__ = ["Activity", "StallInspector", "read_activity", "waited"]
