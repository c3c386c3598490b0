"""The coordinator's answers as pydantic models: what every 2xx and error body holds.

The handlers build plain dicts (the ledger's hot path stays free of model objects); these
`TypedDict`s say what keys and types those dicts carry. The OpenAPI description derives
every response schema from them (`coordinator.openapi`), and the tests validate real
answers against the schemas the served document holds, so an answer that gains, loses or
retypes a key fails a test instead of drifting from its description. Keys are closed
(`extra="forbid"`: `additionalProperties: false` in the document).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, with_config
from typing_extensions import NotRequired, TypedDict

from coordinator.models import Reason

_CLOSED = ConfigDict(extra="forbid")

NodeState = Literal["alive", "waiting", "evicted", "gone", "unknown"]
Time = Annotated[float | None, Field(description="Unix time; null when not known yet.")]


def _doc(kind: Any, description: str) -> Any:
    return Annotated[kind, Field(description=description)]


@with_config(_CLOSED)
class ErrorDetail(TypedDict):
    """What went wrong, for a machine (`code`) and for a person (`message`)."""

    code: _doc(str, "Machine-readable: invalid, malformed_json, unauthorized, forbidden, "
                    "not_found, conflict, etcd_auth_off, payload_too_large, "
                    "unsupported_media_type, unavailable, ...")
    message: _doc(str, "One sentence: what was wrong and what to do.")
    field: NotRequired[_doc(str, "JSON path of the bad field (422 only), e.g. "
                                 "reports[0].contributions[1].samples or query.limit.")]


@with_config(_CLOSED)
class Error(TypedDict):
    """The body of every 4xx/5xx answer."""

    error: ErrorDetail


@with_config(_CLOSED)
class Node(TypedDict):
    """A node's registration, credit, RAC, strikes and state."""

    node_id: str
    display_name: str
    owner: str
    hardware: _doc(dict[str, Any], "The facts the node registered with.")
    registered_at: Time
    last_report_at: Time
    credit: _doc(int, "Total credit: attested accepted samples.")
    rac: _doc(float, "Recent-average credit per day, decayed to now.")
    contributions_accepted: int
    contributions_refused: int
    mean_staleness: _doc(float | None, "Mean staleness of its accepted contributions; "
                                       "null before the first.")
    strikes: int
    disputes: _doc(int, "Reports of this node that contradicted a quorum.")
    reports: int
    throughput: _doc(float, "Credited samples/s over the rate window.")
    state: _doc(NodeState, "From the rendezvous; unknown when none is configured.")


@with_config(_CLOSED)
class StatusNode(Node):
    """A node as the status page lists it."""

    registered: _doc(bool, "False for a node only the rendezvous knows.")


@with_config(_CLOSED)
class NodeList(TypedDict):
    """A page of nodes, by id."""

    nodes: list[Node]
    total: int
    limit: int
    offset: int


@with_config(_CLOSED)
class Registered(TypedDict):
    """A node's token, issued at registration or reissued."""

    node_id: str
    token: _doc(str, "The node's bearer token; shown only now.")
    registered_at: float


@with_config(_CLOSED)
class EtcdNodeCredentials(TypedDict):
    """A node's own etcd user: reads the job's keys, writes only this node's own."""

    node_id: str
    job: str
    user: _doc(str, "etcd user name (horde-node-<job>-<node>).")
    password: _doc(str, "Its password; shown only now. Asking again replaces it.")
    issued_at: float
    etcd_ca: NotRequired[_doc(str, "PEM of the CA that signed etcd's certificate, where the "
                              "rendezvous serves https with a CA file of its own (public; "
                              "check it against the fingerprint the job owner gives, the "
                              "join command's --etcd-ca-sha256).")]


@with_config(_CLOSED)
class ReportResult(TypedDict):
    """What became of one report of the batch (`index` is its place in `reports`)."""

    index: int
    status: Literal["stored", "duplicate", "conflict", "rejected"]
    reason: NotRequired[Literal["not_a_member", "membership_mismatch", "over_limit",
                                "generation_unknown"]]
    message: NotRequired[str]
    retry: NotRequired[_doc(bool, "True: a rejection that can change (the generation is "
                                  "not known yet); send the report again later.")]


@with_config(_CLOSED)
class IngestResult(TypedDict):
    """The answer to a batch of reports: every report in it is durably handled."""

    stored: int
    duplicate: int
    conflict: int
    rejected: int
    settled: _doc(int, "Headers this batch brought to a quorum.")
    credited: _doc(int, "Credit those headers granted.")
    results: list[ReportResult]


@with_config(_CLOSED)
class LeaderboardEntry(TypedDict):
    """One ranked node."""

    rank: int
    node_id: str
    display_name: str
    credit: int
    rac: float
    rounds: int


@with_config(_CLOSED)
class Leaderboard(TypedDict):
    """Nodes ranked by total credit or RAC."""

    order: Literal["credit", "rac"]
    half_life_days: float
    entries: list[LeaderboardEntry]


@with_config(_CLOSED)
class CreditRecord(TypedDict):
    """One attested round (or `span` consecutive rounds) a node was credited for."""

    job: str
    generation: int
    round: int
    credit: int
    samples: int
    staleness: int
    param_version: int
    accepted: bool
    reason: Reason | None
    attesters: int
    granted_at: float
    span: _doc(int, "How many consecutive rounds the record covers.")


@with_config(_CLOSED)
class CreditHistory(TypedDict):
    """The rounds a node was credited for, newest first."""

    node_id: str
    credits: list[CreditRecord]


@with_config(_CLOSED)
class LossPoint(TypedDict):
    """The mean reported loss of one round."""

    time: Time
    generation: int
    round: int
    loss: float


class _JobFigures(TypedDict):
    """What the ledger knows of a job: shared by a listed job and the status page's."""

    job: str | None
    generation: int | None
    members: list[str]
    world_size: int
    rounds: int
    reports: int
    samples_credited: int
    samples_per_second: float
    first_seen: Time
    last_report_at: Time


@with_config(_CLOSED)
class Job(_JobFigures):
    """A job's generation, world size, rounds, samples/s and loss."""

    job: str
    loss: NotRequired[_doc(list[LossPoint], "The loss series (GET /api/v1/jobs/{job} only).")]


@with_config(_CLOSED)
class JobList(TypedDict):
    """Jobs with reports."""

    jobs: list[Job]


@with_config(_CLOSED)
class Event(TypedDict):
    """One entry of a job's timeline."""

    id: int
    time: float
    kind: _doc(str, "registered, token, etcd-credentials, generation, joined, left, "
                   "evicted, pardoned")
    job: str | None
    node_id: str | None
    generation: int | None
    detail: str


@with_config(_CLOSED)
class Timeline(TypedDict):
    """A job's events, newest first."""

    job: str
    events: list[Event]


@with_config(_CLOSED)
class StatusJob(_JobFigures):
    """The shown job as the ledger and the rendezvous see it."""

    state: _doc(str, "The job's state in the rendezvous (forming, running, ...); unknown "
                     "without one.")
    leader: str | None


@with_config(_CLOSED)
class RendezvousState(TypedDict):
    """Whether the coordinator reads a rendezvous, and whether it answers."""

    configured: bool
    reachable: bool | None
    error: str | None


@with_config(_CLOSED)
class Status(TypedDict):
    """Everything the status page shows."""

    now: float
    job: StatusJob
    jobs: list[str]
    rendezvous: RendezvousState
    nodes: list[StatusNode]
    nodes_total: int
    leaderboard: list[LeaderboardEntry]
    timeline: list[Event]
    loss: list[LossPoint]
    half_life_days: float
    refresh_seconds: float


@with_config(_CLOSED)
class EvictionEntry(TypedDict):
    """A blacklist entry of the rendezvous."""

    node_id: str
    job: str
    reason: str
    until: _doc(float | None, "Unix time it ends; null: for good.")
    count: int
    active: bool


@with_config(_CLOSED)
class EvictionList(TypedDict):
    """A job's blacklist as the rendezvous holds it."""

    job: str
    configured: _doc(bool, "False: no rendezvous is configured (the list is empty).")
    evictions: list[EvictionEntry]


@with_config(_CLOSED)
class Health(TypedDict):
    """Liveness: the database answers."""

    status: Literal["ok"]
    schema_revision: str | None
    rendezvous: Literal["not configured", "ok", "unreachable"]


@with_config(_CLOSED)
class Manifest(TypedDict):
    """A volunteer job's owner-signed manifest envelope (base64 fields), as the owner
    signed it; the volunteer client checks the signature."""

    manifest: str | None
    signature: str | None
    public_key: str | None


#: every answer body, by the name the OpenAPI description gives its schema
RESPONSE_MODELS: dict[str, type] = {model.__name__: model for model in (
    Error, Node, NodeList, Registered, EtcdNodeCredentials, ReportResult, IngestResult,
    LeaderboardEntry, Leaderboard, CreditRecord, CreditHistory, LossPoint, Job, JobList,
    Event, Timeline, StatusNode, Status, EvictionEntry, EvictionList, Health, Manifest)}
