"""The node agent: registers a node, keeps its lease alive, follows the generation,
and, when elected, acts as the job's leader.

Every node runs one agent on a background thread. Leadership is an etcd key bound to
the leader's lease: when the leader dies its lease expires, the key vanishes and
another agent takes over. Generations are written by compare-and-swap on the
previous one, so a deposed leader can never overwrite a newer decision.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rendezvous import policy, records
from rendezvous.backend import KeyValue, RendezvousBackend
from rendezvous.errors import (
    BlacklistedError,
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousPermissionError,
    RendezvousTimeoutError,
    RendezvousTLSError,
)
from rendezvous.generation import BlacklistEntry, Generation, JobStatus, NodeInfo
from rendezvous.keys import JobKeys
from rendezvous.settings import RendezvousSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlState:
    """What every member follows: the generation, a requested reset, the job status."""

    generation: Generation | None = None
    reset_of: int = -1
    status: JobStatus | None = None
    leader: str | None = None
    #: the lease the leader key is bound to (0: none, so no agent keeps it alive) and
    #: its mod revision, so a candidate can replace a key nobody keeps alive
    leader_lease: int = 0
    leader_revision: int = 0


#: What `ControlState.leader` holds when the leader key exists but is not a node id.
UNREADABLE_LEADER = "<unreadable leader key>"
#: The value of a `trusted/<node>` key (anything else is logged and ignored).
TRUSTED_MARK = b"1"

#: Seconds between two "no trusted control node alive" warnings of one agent.
NO_LEADER_LOG_EVERY = 10.0


def read_control(backend: RendezvousBackend, keys: JobKeys,
                 previous: ControlState | None = None) -> tuple[ControlState, int]:
    kvs, revision = backend.get_prefix(keys.control)
    return parse_control(kvs, keys, previous), revision


def parse_control(kvs: list[KeyValue], keys: JobKeys,
                  previous: ControlState | None = None) -> ControlState:
    """The control keys as records; an invalid value is logged once and ignored (an
    unreadable generation leaves `previous.generation` in force), never raised."""
    generation = None
    reset_of = -1
    status = None
    leader = None
    leader_lease = leader_revision = 0
    for kv in kvs:
        if kv.key == keys.generation:
            generation = records.read_record(kv, records.parse_generation)
            if generation is None and previous is not None:
                generation = previous.generation
        elif kv.key == keys.reset:
            requested = records.read_record(kv, records.parse_reset)
            reset_of = -1 if requested is None else requested
        elif kv.key == keys.status:
            status = records.read_record(kv, records.parse_status)
        elif kv.key == keys.leader:
            name = records.read_record(kv, lambda data: records.parse_text(data, "leader key"))
            # The key exists, so nobody else can take it: say so rather than "no leader".
            leader = UNREADABLE_LEADER if name is None else name
            leader_lease, leader_revision = kv.lease, kv.mod_revision
    return ControlState(generation, reset_of, status, leader, leader_lease, leader_revision)


def blacklist_node(backend: RendezvousBackend, keys: JobKeys, node_id: str, reason: str,
                   cooldown: tuple[float, float] | None) -> BlacklistEntry:
    """Add (or extend) a blacklist entry; the leader drops the node at the next generation."""
    existing = backend.get(keys.blacklisted(node_id))
    record = records.read_record(existing, records.parse_blacklist_entry) if existing else None
    count = record.count + 1 if record is not None else 1
    delay = policy.cooldown_for(count, cooldown, random.random())
    entry = BlacklistEntry(node_id=node_id, reason=reason, until=time.time() + delay, count=count)
    backend.put(keys.blacklisted(node_id), entry.to_json())
    logger.warning("job %s: blacklisted %s for %.0f s: %s", keys.job, node_id, delay, reason)
    return entry


def registration(kv: KeyValue, keys: JobKeys) -> NodeInfo | None:
    """The registration under `nodes/`, or None (logged once) when it is not one a leader
    may admit: invalid, filed under another node's name, or not bound to a live lease.

    etcd deletes a key when its lease expires and refuses a write under a dead lease, so
    a key bound to a lease is one whose lease was alive when written and still is; a key
    without one would stay forever and name a node nobody keeps alive.
    """
    info = records.read_record(kv, records.parse_node_info)
    if info is None:
        return None
    if kv.key != keys.node(info.node_id):
        records.report_invalid(kv.key, kv.mod_revision,
                               f"registration names node {info.node_id!r}, not its key")
        return None
    if not kv.lease:
        records.report_invalid(kv.key, kv.mod_revision,
                               "registration is not bound to a lease; not admitted")
        return None
    if info.lease != kv.lease:
        records.report_invalid(kv.key, kv.mod_revision,
                               f"registration says lease {info.lease:x} but is bound to "
                               f"lease {kv.lease:x}; not admitted")
        return None
    return info


class NodeAgent:
    """Membership of one node: lease, registration, following and (maybe) leading."""

    def __init__(
        self,
        backend: RendezvousBackend,
        settings: RendezvousSettings,
        info: NodeInfo,
        candidate: bool = True,
        clock: Callable[[], float] = time.monotonic,
        member: bool = True,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.keys = JobKeys(settings.prefix, settings.job)
        self.node_id = info.node_id
        self._info = info
        self._candidate = candidate
        #: False: a standby that only leads (the owner's launcher), never registered
        #: under `nodes/`, so never a member of a generation
        self._member = member
        self._clock = clock
        self._lease = 0
        self._lease_refreshed = 0.0
        self._cond = threading.Condition()
        self._control = ControlState()
        self._listeners: list[Callable[[ControlState], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._is_leader = False
        self._leader_memory: dict[str, object] = {}
        #: the revision up to which `_control` is known current (a follower whose watch
        #: timed out from it reads nothing again: a keepalive is no reason to re-read)
        self._control_revision: int | None = None
        self._no_leader_logged = float("-inf")
        self.error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Register (fails fast with RendezvousConnectionError if etcd is unreachable)."""
        self._register()
        control, revision = read_control(self.backend, self.keys)
        self._set_control(control)
        self._control_revision = revision
        self._thread = threading.Thread(
            target=self._run, name=f"horde-agent-{self.node_id}", daemon=True)
        self._thread.start()

    def _register(self) -> None:
        entry = self.backend.get(self.keys.blacklisted(self.node_id))
        record = records.read_record(entry, records.parse_blacklist_entry) if entry else None
        if record is not None and record.active(time.time()):
            raise BlacklistedError(
                f"node {self.node_id} is blacklisted in job {self.settings.job} until "
                f"{time.ctime(record.until)}: {record.reason}")
        if self._member:
            # A leave announced by an earlier run of this node would keep it out for good:
            # the leader treats a node under `leaving/` as gone even while registered.
            self.backend.delete(self.keys.leaving_node(self.node_id))
        self._lease = self.backend.grant_lease(self.settings.lease_ttl)
        self._lease_refreshed = self._clock()
        if not self._member:  # the lease only carries the leader key
            logger.info("job %s: %s stands by to lead (lease %x)", self.settings.job,
                        self.node_id, self._lease)
            return
        info = NodeInfo(**{**self._info.__dict__, "lease": self._lease,
                           "registered_at": time.time()})
        self._info = info
        self.backend.put(self.keys.node(self.node_id), info.to_json(), lease=self._lease)
        logger.info("job %s: node %s registered (lease %x)", self.settings.job, self.node_id,
                    self._lease)

    def stop(self, reason: str = "left") -> None:
        """Leave the job: say why (finished / left), then revoke the lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._member:
                self.backend.put(self.keys.leaving_node(self.node_id), reason.encode())
            if self._lease:
                self.backend.revoke_lease(self._lease)
        except RendezvousConnectionError:
            logger.warning("job %s: node %s could not deregister: etcd unreachable",
                           self.settings.job, self.node_id)
        self._lease = 0

    # -- what the training side reads -------------------------------------------------

    @property
    def control(self) -> ControlState:
        with self._cond:
            return self._control

    @property
    def is_leader(self) -> bool:
        return self._is_leader

    def add_listener(self, listener: Callable[[ControlState], None]) -> None:
        """Call `listener(control)` from the agent thread whenever control keys change."""
        with self._cond:
            self._listeners.append(listener)

    def mark_ready(self, generation: int, reset: bool = False) -> None:
        """Say that this node is ready for the generation after `generation` (`reset`: and
        that its collective failed). Written to this node's own key, so a volunteer's etcd
        role (its own keys only) suffices; the leader announces the reset to everyone."""
        record = json.dumps({"generation": generation, "reset": reset}).encode()
        self.backend.put(self.keys.ready_node(self.node_id), record, lease=self._lease)

    def request_reset(self, generation: int) -> None:
        """Report that the collective of `generation` failed and this node is ready again."""
        self.mark_ready(generation, reset=True)

    def publish_activity(self, value: bytes | None) -> None:
        """Write (None: delete) this node's activity record, bound to its lease."""
        key = self.keys.activity_node(self.node_id)
        if value is None:
            self.backend.delete(key)
        elif self._lease:
            self.backend.put(key, value, lease=self._lease)

    def wait_for_generation(self, after: int, timeout: float) -> Generation:
        """Block until a generation newer than `after` includes this node."""
        deadline = self._clock() + timeout
        with self._cond:
            while True:
                control = self._control
                if control.status is not None and control.status.state != "running":
                    raise RendezvousClosedError(
                        f"job {self.settings.job} {control.status.state}: "
                        f"{control.status.message}")
                gen = control.generation
                if gen is not None and gen.id > after and gen.rank_of(self.node_id) is not None:
                    return gen
                if self.error is not None:
                    raise self.error
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise RendezvousTimeoutError(
                        f"node {self.node_id} was not admitted to job {self.settings.job} "
                        f"within {timeout:g} s (latest generation: "
                        f"{gen.id if gen else 'none'}, members "
                        f"{gen.node_ids if gen else []})")
                self._cond.wait(min(remaining, 0.5))

    # -- the agent thread -------------------------------------------------------------

    def _set_control(self, control: ControlState) -> None:
        with self._cond:
            changed = control != self._control
            self._control = control
            listeners = list(self._listeners)
            self._cond.notify_all()
        if changed:
            for listener in listeners:
                try:
                    listener(control)
                except Exception:  # noqa: BLE001 - a listener must not kill the agent
                    logger.exception("membership listener failed")

    def outage_limit(self) -> float:
        """Seconds this agent keeps retrying an unreachable etcd before it gives up: the
        job's elastic timeout (at least four lease TTLs), as for any membership wait."""
        return max(4.0 * self.settings.lease_ttl, self.settings.elastic_timeout)

    def _run(self) -> None:
        down_since: float | None = None
        next_note = 0.0
        while not self._stop.is_set():
            try:
                self._step()
                if down_since is not None:
                    logger.warning("job %s: node %s: etcd answers again after %.1f s; going on",
                                   self.settings.job, self.node_id, self._clock() - down_since)
                    down_since = None
            except RendezvousConnectionError as exc:
                now = self._clock()
                if down_since is None:
                    down_since = now
                    next_note = now + 5.0
                    logger.warning(
                        "job %s: node %s: %s. Waiting up to %g s (the elastic timeout) for "
                        "etcd to answer again; training goes on meanwhile, membership "
                        "changes wait", self.settings.job, self.node_id, exc,
                        self.outage_limit())
                elif now >= next_note:
                    logger.warning("job %s: node %s: etcd unreachable for %.0f s (giving up "
                                   "after %g s): %s", self.settings.job, self.node_id,
                                   now - down_since, self.outage_limit(), exc)
                    next_note = now + 5.0
                if now - down_since > self.outage_limit():
                    self.error = RendezvousConnectionError(
                        f"job {self.settings.job}: node {self.node_id} could not reach etcd "
                        f"for {now - down_since:.0f} s, longer than the elastic timeout "
                        f"({self.outage_limit():g} s): {exc}")
                    with self._cond:
                        self._cond.notify_all()
                self._stop.wait(min(self.settings.poll_interval, 1.0))
            except Exception as exc:  # noqa: BLE001 - surfaced to the training side
                logger.exception("job %s: agent of %s failed", self.settings.job, self.node_id)
                self.error = exc
                with self._cond:
                    self._cond.notify_all()
                return

    def _keepalive_due(self) -> float:
        return self._lease_refreshed + self.settings.lease_ttl / 3.0

    def _refresh(self) -> None:
        if self._clock() < self._keepalive_due():
            return
        if self.backend.refresh_lease(self._lease):
            self._lease_refreshed = self._clock()
            return
        logger.warning("job %s: lease of %s expired (was the process stopped?); "
                       "registering again", self.settings.job, self.node_id)
        self._is_leader = False
        self._register()

    def _step(self) -> None:
        """One pass: keep the lease, read what this node follows, lead if elected, wait.

        Only the leader reads the whole job; the others read the control keys alone, so
        a job of hundreds of nodes costs etcd little per node.
        """
        self._refresh()
        wake_at = None
        if self._is_leader:
            self._control_revision = None
            kvs, revision = self.backend.get_prefix(self.keys.root)
            control = parse_control([kv for kv in kvs if kv.key.startswith(self.keys.control)],
                                    self.keys, self.control)
        elif self._control_revision is not None:
            # Nothing under control/ changed since this revision (the last watch timed
            # out): the generation (a record per member) need not be read again.
            control, revision = self.control, self._control_revision
        else:
            control, revision = read_control(self.backend, self.keys, self.control)
        self._control_revision = None
        self._set_control(control)
        if control.leader != self.node_id:
            self._is_leader = False
        elif not self._is_leader and self._candidate and self._holds_leader_key():
            # Our election write was applied but its answer was lost (the etcd member
            # failed): the key is ours, bound to our lease, so lead.
            self._become_leader()
            return
        if self._is_leader:
            wake_at = self._lead(kvs, control)
        elif self._candidate and control.leader is None:
            self._try_lead()
            if self._is_leader:
                return  # lead at once, from a full read
        elif self._candidate and not control.leader_lease and control.leader_revision:
            # A leader key bound to no lease never expires and no agent wrote it: replace
            # it (compare-and-swap on its revision, so one candidate wins).
            records.report_invalid(self.keys.leader, control.leader_revision,
                                   f"leader key {control.leader!r} is bound to no lease, so "
                                   "no agent keeps it alive; a candidate takes over")
            self._try_lead(control.leader_revision)
            if self._is_leader:
                return
        if control.leader is None and not self._candidate:
            self._say_no_leader()
        watch = self.keys.root if self._is_leader else self.keys.control
        timeout = max(0.0, self._keepalive_due() - self._clock())
        timeout = min(timeout, self.settings.poll_interval * 4)
        if wake_at is not None:
            timeout = min(timeout, max(0.0, wake_at - self._clock()))
        if timeout > 0:
            changed = self.backend.wait_for_change(watch, revision, timeout)
            if not changed and not self._is_leader:
                self._control_revision = revision

    def _try_lead(self, expected_revision: int = 0) -> None:
        try:
            won = self.backend.compare_and_swap(self.keys.leader, expected_revision,
                                                self.node_id.encode(), lease=self._lease)
        except (RendezvousConnectionError, RendezvousTLSError):
            raise  # not about the lease: the outage handling (or the job's error) has it
        except RendezvousPermissionError as exc:
            # etcd auth is on and this node is no control identity: it never leads.
            self._candidate = False
            logger.warning("job %s: node %s may not lead (etcd refused its write of the "
                           "leader key: it is not a trusted control identity); it follows "
                           "the trusted nodes: %s", self.settings.job, self.node_id, exc)
            return
        except RendezvousError as exc:
            # Our lease is gone (revoked, or it ran out before the keepalive was due):
            # force the keepalive now, which finds that out and registers again.
            logger.warning("job %s: node %s cannot lead: %s; registering again",
                           self.settings.job, self.node_id, exc)
            self._lease_refreshed = float("-inf")
            return
        if won:
            self._become_leader()

    def _say_no_leader(self) -> None:
        """Log (at most every NO_LEADER_LOG_EVERY s) that this non-candidate waits for a
        trusted control node to lead."""
        now = self._clock()
        if now - self._no_leader_logged < NO_LEADER_LOG_EVERY:
            return
        self._no_leader_logged = now
        logger.warning("job %s: no trusted control node alive; waiting (node %s may not lead; "
                       "start the owner's launcher or a node holding control credentials)",
                       self.settings.job, self.node_id)

    def _holds_leader_key(self) -> bool:
        kv = self.backend.get(self.keys.leader)
        return (kv is not None and kv.value == self.node_id.encode() and bool(self._lease)
                and kv.lease == self._lease)

    def _become_leader(self) -> None:
        self._is_leader = True
        self._leader_memory = {"first_seen": {}, "ready_since": None,
                               "starving_since": None, "generation": None}
        logger.info("job %s: node %s is now the leader", self.settings.job, self.node_id)

    # -- leading ----------------------------------------------------------------------

    def _lead(self, kvs: list[KeyValue], control: ControlState) -> float | None:
        """Observe, decide, apply; returns when the leader wants to look again."""
        if control.status is not None and control.status.state != "running":
            return None
        keys = self.keys
        now = self._clock()
        mem = self._leader_memory
        first_seen: dict[str, float] = mem["first_seen"]  # type: ignore[assignment]
        nodes: dict[str, NodeInfo] = {}
        blacklist: dict[str, BlacklistEntry] = {}
        leaving: dict[str, str] = {}
        trusted: set[str] = set()
        gen = control.generation
        ready: set[str] = set()
        reset_by: str | None = None
        gen_mod_revision = 0
        generation_unreadable = False
        for kv in kvs:
            if kv.key.startswith(keys.nodes):
                info = registration(kv, keys)
                if info is not None:
                    nodes[info.node_id] = info
                    first_seen.setdefault(info.node_id, now)
            elif kv.key.startswith(keys.blacklist):
                entry = records.read_record(kv, records.parse_blacklist_entry)
                if entry is not None and kv.key == keys.blacklisted(entry.node_id):
                    blacklist[entry.node_id] = entry
                elif entry is not None:
                    records.report_invalid(kv.key, kv.mod_revision,
                                           f"blacklist entry names node {entry.node_id!r}")
            elif kv.key.startswith(keys.trusted):
                node_id = records.node_id_of(kv.key, keys.trusted)
                if node_id is not None and kv.value == TRUSTED_MARK:
                    trusted.add(node_id)
                else:
                    records.report_invalid(kv.key, kv.mod_revision,
                                           f"a trust mark must hold {TRUSTED_MARK!r}")
            elif kv.key.startswith(keys.leaving):
                node_id = records.node_id_of(kv.key, keys.leaving)
                why = records.read_record(kv, lambda d: records.parse_text(d, "leaving reason"))
                if node_id is not None and why is not None:
                    leaving[node_id] = why
            elif gen is not None and kv.key.startswith(keys.ready):
                node_id = records.node_id_of(kv.key, keys.ready)
                marker = records.read_record(kv, records.parse_ready)
                # A marker of an earlier generation is stale (it stays until its lease ends).
                if node_id is not None and marker is not None and marker[0] == gen.id:
                    ready.add(node_id)
                    if marker[1] and gen.rank_of(node_id) is not None:
                        reset_by = reset_by or node_id
            elif kv.key == keys.generation:
                gen_mod_revision = kv.mod_revision
                generation_unreadable = gen is None
        if generation_unreadable:
            # The generation key holds no valid record and this agent never saw one:
            # publishing generation 0 over it would send the members backwards. Wait
            # (logged once by parse_control) until a valid generation is written.
            return None
        if gen is not None and reset_by is not None and control.reset_of != gen.id:
            # A member reported a failed collective: tell every member (they watch only
            # `control/`, which only trusted identities may write).
            self.backend.put(keys.reset, json.dumps({"generation": gen.id,
                                                     "by": reset_by}).encode())
            logger.info("job %s: reset of generation %d requested by %s", keys.job, gen.id,
                        reset_by)
        for node_id in list(first_seen):
            if node_id not in nodes:
                del first_seen[node_id]
        gen_id = gen.id if gen else None
        if mem["generation"] != gen_id:
            mem["generation"] = gen_id
            mem["ready_since"] = None
        if ready and mem["ready_since"] is None:
            mem["ready_since"] = now
        view = policy.ClusterView(
            generation=gen, nodes=nodes, ready=ready, blacklist=blacklist, leaving=leaving,
            trusted=trusted, first_seen=first_seen, ready_since=mem["ready_since"],  # type: ignore[arg-type]
            starving_since=mem["starving_since"], wall_now=time.time(),  # type: ignore[arg-type]
        )
        decision = policy.decide(view, self.settings, now)
        for node_id in decision.blacklist:
            # An expired entry from an earlier eviction must not shield a repeat offender:
            # only an active one means "already blacklisted" (its count then grows).
            if node_id not in blacklist or not blacklist[node_id].active(view.wall_now):
                blacklist_node(self.backend, keys, node_id,
                               "did not rejoin after a failed collective within the reset "
                               f"timeout of {self.settings.reset_timeout:g} s",
                               self.settings.blacklist_cooldown)
        mem["starving_since"] = (mem["starving_since"] or now) if decision.starving else None
        if decision.action == policy.Action.PUBLISH:
            new = policy.build_generation(gen, decision.members, nodes, decision.reason,
                                          time.time(), self.settings)
            if self.backend.compare_and_swap(keys.generation, gen_mod_revision, new.to_json()):
                logger.info("job %s: generation %d published by %s: %d members (%s)",
                            keys.job, new.id, self.node_id, new.size, decision.reason)
                if gen is None:
                    self.backend.put(keys.status, JobStatus("running").to_json())
            return None
        if decision.action in (policy.Action.FAIL, policy.Action.FINISH):
            state = "failed" if decision.action == policy.Action.FAIL else "finished"
            self.backend.put(keys.status, JobStatus(state, decision.reason).to_json())
            if state == "failed":
                logger.error("job %s failed: %s", keys.job, decision.reason)
            return None
        return decision.wake_at
