"""The leader's membership decisions as a pure function of what it observes.

`decide(view, settings, now)` returns what to do next; the agent applies it. No I/O
and no sleeping here, so every rule is unit-tested without processes or etcd.

Rules (DESIGN.md, Membership):
- first generation: once `target_np` nodes are registered and joins have settled,
  or after `start_timeout` with at least `min_np`;
- a member whose lease expired, that was blacklisted or that left: publish the
  survivors at once (survivors keep their order, the trusted ones first; newcomers go
  last, since they hold no state to broadcast);
- ranks: the members the job owner marked trusted come first among those that hold the
  state (the first generation's, and the survivors), so rank 0, whose state every reset
  and the first broadcast send to all, is trusted whenever it can be;
- a member reported a failed collective (a ready marker) but nobody is known dead:
  wait until every live member is ready, or `reset_timeout`, then drop the
  unresponsive ones and blacklist them;
- nodes waiting and the world under `max_np`: admit them in one batch once no new
  node arrived for `settle_window`, or at the latest `admission_window` (never less
  than `settle_window`) after the first of them;
- fewer than `min_np` candidates: wait; past `elastic_timeout`, fail the job;
- a member's worker process ended after its work (its agent left as "finished", at
  process exit, never at `hvd.shutdown()`): the job is finished, no new generation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from rendezvous.generation import BlacklistEntry, Generation, Member, NodeInfo
from rendezvous.settings import RendezvousSettings


class Action(str, enum.Enum):
    """What the leader does next."""

    WAIT = "wait"
    PUBLISH = "publish"
    FAIL = "fail"
    FINISH = "finish"


@dataclass
class ClusterView:
    """One consistent read of the job's keys plus the leader's own observations."""

    generation: Generation | None
    nodes: dict[str, NodeInfo]
    ready: set[str] = field(default_factory=set)
    blacklist: dict[str, BlacklistEntry] = field(default_factory=dict)
    leaving: dict[str, str] = field(default_factory=dict)
    #: nodes the job owner marked trusted (`trusted/`): ranked first
    trusted: set[str] = field(default_factory=set)
    #: leader-monotonic time each node was first seen (wall clocks of volunteers differ)
    first_seen: dict[str, float] = field(default_factory=dict)
    ready_since: float | None = None
    starving_since: float | None = None
    wall_now: float = 0.0


@dataclass(frozen=True)
class Decision:
    action: Action
    members: tuple[str, ...] = ()
    reason: str = ""
    blacklist: tuple[str, ...] = ()
    wake_at: float | None = None
    starving: bool = False


def trusted_first(members: list[str] | tuple[str, ...], trusted: set[str]) -> tuple[str, ...]:
    """`members` with the trusted ones first, each group in its own order."""
    return tuple([m for m in members if m in trusted] + [m for m in members if m not in trusted])


def _is_blacklisted(view: ClusterView, node: NodeInfo) -> bool:
    for key in (node.node_id, node.host):
        entry = view.blacklist.get(key)
        if entry is not None and entry.active(view.wall_now):
            return True
    return False


def eligible_nodes(view: ClusterView) -> list[NodeInfo]:
    """Registered, not blacklisted, not leaving: ordered by when the leader first saw them."""
    nodes = [
        n for n in view.nodes.values()
        if n.node_id not in view.leaving and not _is_blacklisted(view, n)
    ]
    return sorted(nodes, key=lambda n: (view.first_seen.get(n.node_id, 0.0), n.order,
                                        n.registered_at, n.node_id))


def _settled(view: ClusterView, newcomers: list[NodeInfo], settings: RendezvousSettings,
             now: float) -> tuple[bool, float]:
    """Whether the joins have settled: no newcomer for a settle window (at most an
    admission window after the first), and no launch batch still incomplete.

    A launch batch (the workers one `horderun` started together) whose members have not
    all registered holds the joins for up to `start_timeout` after its first member:
    starting several Python processes can take longer than a settle window, and admitting
    them one by one would cost a reset each.
    """
    seen = [view.first_seen.get(n.node_id, now) for n in newcomers]
    quiet_at = max(seen) + settings.settle_window
    cap_at = min(seen) + max(settings.admission_window, settings.settle_window)
    wake = min(quiet_at, cap_at)
    for batch, size in {(n.batch, n.batch_size) for n in newcomers if n.batch}:
        members = [n for n in view.nodes.values() if n.batch == batch]
        if len(members) < size:
            first = min(view.first_seen.get(n.node_id, now) for n in members)
            wake = max(wake, first + settings.start_timeout)
    return now >= wake, wake


def decide(view: ClusterView, settings: RendezvousSettings, now: float) -> Decision:
    """The next membership action for the leader at monotonic time `now`."""
    finished = [m.node_id for m in view.generation.members
                if view.leaving.get(m.node_id) == "finished"] if view.generation else []
    if finished:
        return Decision(Action.FINISH,
                        reason=f"member {finished[0]} finished: its worker process ended")
    candidates = eligible_nodes(view)
    by_id = {n.node_id: n for n in candidates}
    gen = view.generation

    if gen is None:
        return _first_generation(view, candidates, settings, now)

    # A member registered under another lease than the one it was admitted with lost
    # that registration (its lease expired or was revoked) and came back: gone, and a
    # newcomer again.
    returned = {m.node_id for m in gen.members if m.node_id in by_id and m.lease
                and by_id[m.node_id].lease and by_id[m.node_id].lease != m.lease}
    alive = [m.node_id for m in gen.members if m.node_id in by_id and m.node_id not in returned]
    gone = [m.node_id for m in gen.members if m.node_id not in by_id or m.node_id in returned]
    newcomers = [n for n in candidates
                 if gen.rank_of(n.node_id) is None or n.node_id in returned]
    ready = [m for m in alive if m in view.ready]

    if gone or ready:
        blacklist: tuple[str, ...] = ()
        survivors = alive
        if not gone and len(ready) < len(alive):
            since = view.ready_since if view.ready_since is not None else now
            deadline = since + settings.reset_timeout
            if now < deadline:
                return Decision(Action.WAIT, wake_at=deadline)
            blacklist = tuple(m for m in alive if m not in ready)
            survivors = ready
        room = settings.max_np - len(survivors)
        joining = [n.node_id for n in newcomers][: max(room, 0)]
        members = trusted_first(survivors, view.trusted) + tuple(joining)
        why = []
        if gone:
            why.append("lost " + ", ".join(gone))
        if blacklist:
            why.append("unresponsive " + ", ".join(blacklist))
        if ready and not gone and not blacklist:
            why.append("collective failure reported")
        if joining:
            why.append("admitted " + ", ".join(joining))
        return _publish_or_starve(view, members, "; ".join(why), settings, now, blacklist)

    if newcomers and len(gen.members) < settings.max_np:
        settled, wake = _settled(view, newcomers, settings, now)
        if not settled:
            return Decision(Action.WAIT, wake_at=wake)
        room = settings.max_np - len(gen.members)
        joining = [n.node_id for n in newcomers][:room]
        return Decision(Action.PUBLISH,
                        members=trusted_first(gen.node_ids, view.trusted) + tuple(joining),
                        reason="admitted " + ", ".join(joining))
    return Decision(Action.WAIT)


def _first_generation(view: ClusterView, candidates: list[NodeInfo],
                      settings: RendezvousSettings, now: float) -> Decision:
    if not candidates:
        return Decision(Action.WAIT)
    started = min(view.first_seen.get(n.node_id, now) for n in candidates)
    candidates = sorted(candidates, key=lambda n: (n.node_id not in view.trusted, n.order,
                                                   n.registered_at, n.node_id))
    ids = tuple(n.node_id for n in candidates)[: settings.max_np]
    if len(candidates) >= settings.target_np:
        settled, wake = _settled(view, candidates, settings, now)
        if settled or len(candidates) >= settings.max_np:
            return Decision(Action.PUBLISH, members=ids, reason="job started")
        return Decision(Action.WAIT, wake_at=wake)
    deadline = started + settings.start_timeout
    if now >= deadline:
        if len(candidates) >= settings.min_np and settings.elastic:
            return Decision(Action.PUBLISH, members=ids, reason="job started (start timeout)")
        return Decision(
            Action.FAIL,
            reason=(
                f"only {len(candidates)} of the {settings.target_np} requested workers "
                f"registered within the start timeout of {settings.start_timeout:g} s; "
                "start more workers or raise --start-timeout"
            ),
        )
    return Decision(Action.WAIT, wake_at=deadline)


def _publish_or_starve(view: ClusterView, members: tuple[str, ...], reason: str,
                       settings: RendezvousSettings, now: float,
                       blacklist: tuple[str, ...]) -> Decision:
    if len(members) >= settings.min_np:
        return Decision(Action.PUBLISH, members=members, reason=reason, blacklist=blacklist)
    since = view.starving_since if view.starving_since is not None else now
    deadline = since + settings.elastic_timeout
    if now >= deadline:
        return Decision(
            Action.FAIL,
            reason=(
                f"the job had {len(members)} worker(s), fewer than min_np={settings.min_np}, "
                f"for the elastic timeout of {settings.elastic_timeout:g} s; add workers "
                "(horderun --join) or lower --min-np"
            ),
            blacklist=blacklist,
        )
    return Decision(Action.WAIT, wake_at=deadline, starving=True, blacklist=blacklist)


def build_generation(previous: Generation | None, members: tuple[str, ...],
                     nodes: dict[str, NodeInfo], reason: str, wall_now: float,
                     settings: RendezvousSettings | None = None) -> Generation:
    """The generation record for `members`.

    Its store is the one the job owner's launcher serves beside the relay hub when the job
    has one (a job served beyond loopback): the store tells members where to connect, so a
    volunteer that hosted it could redirect its peers. Without it, rank 0 serves the store.
    With a member that accepts no inbound connection (or relay_mode "always"), the
    generation's process groups also exchange through the relay hub.
    """
    records = tuple(
        Member(node_id=n, host=nodes[n].host, addr=nodes[n].addr, slots=nodes[n].slots,
               lease=nodes[n].lease, reachable=nodes[n].reachable)
        for n in members
    )
    first = nodes[members[0]]
    relay = ""
    if settings is not None and settings.relay and settings.relay_mode != "never" and len(
            members) > 1:
        hidden = [m.node_id for m in records if not m.reachable]
        if hidden or settings.relay_mode == "always":
            relay = settings.relay
            if hidden:
                reason += f"; through the relay: {len(hidden)} member(s) accept no inbound " \
                          "connections"
    if relay:
        return Generation(
            id=(previous.id + 1) if previous else 0, members=records,
            store_host=relay.rpartition(":")[0].strip("[]"),
            store_port=settings.relay_store_port,  # type: ignore[union-attr]
            reason=reason, created_at=wall_now, relay=relay)
    store_host, store_port = first.addr, first.store_port
    if settings is not None and settings.relay and settings.relay_store_port:
        store_host = settings.relay.rpartition(":")[0].strip("[]")
        store_port = settings.relay_store_port
    return Generation(
        id=(previous.id + 1) if previous else 0,
        members=records,
        store_host=store_host,
        store_port=store_port,
        reason=reason,
        created_at=wall_now,
    )


def cooldown_for(count: int, cooldown: tuple[float, float] | None, jitter: float) -> float:
    """Seconds a node stays blacklisted after its `count`-th eviction.

    Without a range the blacklist is permanent (Horovod's default). With `(lo, hi)`
    the delay doubles with each eviction from `lo`, capped at `hi`; `jitter` in [0, 1)
    spreads nodes evicted together.
    """
    if cooldown is None:
        return float("inf")
    low, high = cooldown
    # A float power: 2 ** 1030 as an int cannot be converted to a float (OverflowError),
    # and the cap is reached long before 1000 doublings anyway.
    doublings = min(max(count - 1, 0), 1000)
    return min(high, low * 2.0**doublings + jitter * low)
