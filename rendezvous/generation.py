"""Records stored in the rendezvous: node registrations, generations, blacklist entries.

All are JSON so that an operator can read them with `etcdctl get --prefix /horde/`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class NodeInfo:
    """What a node says about itself when it registers (bound to its lease)."""

    node_id: str
    host: str
    addr: str
    store_port: int
    slots: int = 1
    pid: int = 0
    lease: int = 0
    registered_at: float = 0.0
    #: launcher-assigned position, so the first generation's ranks follow launch order
    order: int = 0
    hardware: dict[str, Any] = field(default_factory=dict)
    #: launch batch: the workers one `horderun` started together, admitted together
    batch: str = ""
    batch_size: int = 1
    #: whether the relay could dial this node back at `addr` (True where nobody checked)
    reachable: bool = True

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> NodeInfo:
        """Parse and validate; `records.InvalidRecordError` says what was wrong."""
        from rendezvous.records import parse_node_info

        return parse_node_info(data)


@dataclass(frozen=True)
class Member:
    """One member of a generation; its rank is its position in the member list."""

    node_id: str
    host: str
    addr: str
    slots: int = 1
    #: the lease it was registered under when admitted: a different one later means
    #: that registration died and the node came back as a newcomer
    lease: int = 0
    #: whether it accepts inbound connections (see `NodeInfo.reachable`)
    reachable: bool = True


@dataclass(frozen=True)
class Generation:
    """An immutable membership record: id, ordered members, and where its store lives."""

    id: int
    members: tuple[Member, ...]
    store_host: str
    store_port: int
    reason: str = ""
    created_at: float = 0.0
    #: HOST:PORT of the relay hub whose process groups this generation uses ("": Gloo)
    relay: str = ""

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def node_ids(self) -> list[str]:
        return [m.node_id for m in self.members]

    def rank_of(self, node_id: str) -> int | None:
        for rank, member in enumerate(self.members):
            if member.node_id == node_id:
                return rank
        return None

    def local_layout(self, node_id: str) -> tuple[int, int, int, int]:
        """(local_rank, local_size, cross_rank, cross_size) as horovodrun assigns them.

        Local ranks number the members on the same host in rank order; the cross
        communicator joins the members with the same local rank across hosts.
        """
        me = self.members[self.rank_of(node_id)]  # type: ignore[index]
        same_host = [m.node_id for m in self.members if m.host == me.host]
        local_rank = same_host.index(node_id)
        hosts: list[str] = []
        for m in self.members:
            if m.host not in hosts:
                hosts.append(m.host)
        counts = {h: sum(1 for m in self.members if m.host == h) for h in hosts}
        cross_hosts = [h for h in hosts if counts[h] > local_rank]
        return local_rank, len(same_host), cross_hosts.index(me.host), len(cross_hosts)

    def to_json(self) -> bytes:
        data = asdict(self)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Generation:
        """Parse and validate; `records.InvalidRecordError` says what was wrong."""
        from rendezvous.records import parse_generation

        return parse_generation(data)


@dataclass(frozen=True)
class BlacklistEntry:
    """Why a node is kept out and until when (wall-clock seconds; inf = for good)."""

    node_id: str
    reason: str
    until: float
    count: int = 1

    def active(self, now: float) -> bool:
        return now < self.until

    def to_json(self) -> bytes:
        until = "inf" if self.until == float("inf") else self.until
        return json.dumps({**asdict(self), "until": until}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BlacklistEntry:
        """Parse and validate; `records.InvalidRecordError` says what was wrong."""
        from rendezvous.records import parse_blacklist_entry

        return parse_blacklist_entry(data)


@dataclass(frozen=True)
class JobStatus:
    """The job's fate as the leader sees it: running, finished or failed (with why)."""

    state: str
    message: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobStatus:
        """Parse and validate; `records.InvalidRecordError` says what was wrong."""
        from rendezvous.records import parse_status

        return parse_status(data)
