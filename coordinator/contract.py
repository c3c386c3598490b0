"""The report contract between training workers and the coordinator.

A worker registers its node once (`POST /api/v1/nodes`) and keeps the token it gets.
After every round it queues one `RoundReport`: what *it* saw in that round's collective
(every member's contribution header), and sends the queue in batches
(`POST /api/v1/reports`, `{"node_id": ..., "reports": [...]}`) from a background thread.
See docs/coordinator.md for the credit rules built on it.

The JSON schemas below are both published (OpenAPI) and enforced (`coordinator.schema`).
The dataclasses are what the server works with, and what a client may build and send
with `to_json()`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from coordinator.errors import ValidationError
from coordinator.schema import compile_schema

MAX_SAFE_INT = 2**53 - 1  # integers a JavaScript client (the status page) reads exactly
MAX_GENERATION = 2**31 - 1  # a job publishes one generation per membership change
MAX_ROUND = 2**40  # rounds (and parameter versions) of one generation
MAX_HARDWARE_NUMBER = 10**15  # hardware facts are counts and sizes, not 4000-digit integers
MAX_TIMESTAMP = 10**11  # Unix seconds (the year 5138)
MAX_LOSS = 1e30
MAX_MEMBERS = 1024
MAX_REPORTS_PER_BATCH = 1000
MAX_SAMPLES = 10**9
MAX_STALENESS = 10**6
MAX_SPAN = 10**6
NODE_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
JOB_PATTERN = "^[A-Za-z0-9._-]{1,64}$"
TEXT_PATTERN = "^[^\\x00-\\x1f\\x7f]*$"  # one line of printable text


class Reason(str, enum.Enum):
    """Why a member's contribution did not enter the round's aggregate.

    absent: no finished gradient within the round deadline (it goes into a later round);
    stale: its staleness exceeded the bound S and it was dropped;
    nonfinite: it held NaN/Inf (a strike);
    outlier: its norm was an outlier (a strike);
    other: any other refusal.
    """

    ABSENT = "absent"
    STALE = "stale"
    NONFINITE = "nonfinite"
    OUTLIER = "outlier"
    OTHER = "other"


#: agreed refusals that count as a strike against the contributing node
STRIKE_REASONS = frozenset({Reason.NONFINITE.value, Reason.OUTLIER.value})

NODE_ID = {"type": "string", "pattern": NODE_ID_PATTERN,
           "description": "A node id as registered in the rendezvous (1-128 characters)."}
JOB_NAME = {"type": "string", "pattern": JOB_PATTERN, "description": "A job name."}
TEXT_64 = {"type": "string", "maxLength": 64, "pattern": TEXT_PATTERN}

CONTRIBUTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One member's contribution header as the reporter saw it in the round.",
    "additionalProperties": False,
    "required": ["node_id", "samples", "staleness", "param_version", "accepted"],
    "properties": {
        "node_id": NODE_ID,
        "samples": {"type": "integer", "minimum": 0, "maximum": MAX_SAMPLES,
                    "description": "Samples the gradient was computed on."},
        "staleness": {"type": "integer", "minimum": 0, "maximum": MAX_STALENESS,
                      "description": "Round minus the parameter version it was computed on."},
        "param_version": {"type": "integer", "minimum": 0, "maximum": MAX_ROUND,
                          "description": "Parameter version of the gradient."},
        "accepted": {"type": "boolean",
                     "description": "Whether it entered the round's aggregate."},
        "reason": {"type": "string", "enum": [r.value for r in Reason],
                   "description": "Why not; required when accepted is false, "
                                  "absent when true."},
    },
}

REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "What one reporter saw in one round (job, generation, round).",
    "additionalProperties": False,
    "required": ["job", "generation", "round", "members", "contributions"],
    "properties": {
        "job": JOB_NAME,
        "generation": {"type": "integer", "minimum": 0, "maximum": MAX_GENERATION,
                       "description": "Rendezvous generation id."},
        "round": {"type": "integer", "minimum": 0, "maximum": MAX_ROUND,
                  "description": "Round number (the aggregate's version)."},
        "span": {"type": "integer", "minimum": 1, "maximum": MAX_SPAN,
                 "description": "Optional, default 1: the report covers rounds `round` to "
                                "`round + span - 1` with the same members (consecutive "
                                "synchronous steps reported together); samples are summed "
                                "over them."},
        "members": {"type": "array", "items": NODE_ID, "minItems": 1,
                    "maxItems": MAX_MEMBERS, "uniqueItems": True,
                    "description": "The round's members in rank order; must include "
                                   "the reporter."},
        "contributions": {"type": "array", "minItems": 1, "maxItems": MAX_MEMBERS,
                          "items": {"$ref": "#/components/schemas/Contribution"},
                          "description": "Exactly one header per member."},
        "loss": {"type": "number", "minimum": -MAX_LOSS, "maximum": MAX_LOSS,
                 "description": "Optional: the reporter's training loss in this round."},
        "timestamp": {"type": "number", "minimum": 0, "maximum": MAX_TIMESTAMP,
                      "description": "Optional: wall-clock time (Unix seconds) the round "
                                     "closed at the reporter; gives the report lag."},
    },
}

REPORT_BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["node_id", "reports"],
    "properties": {
        "node_id": {**NODE_ID, "description": "The reporter; the bearer token must be its."},
        "reports": {"type": "array", "minItems": 1, "maxItems": MAX_REPORTS_PER_BATCH,
                    "items": {"$ref": "#/components/schemas/RoundReport"}},
    },
}

HARDWARE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "maxProperties": 32,
    "description": "Free-form facts about the node (gpu, gpu_memory_gb, cpu, ...).",
    "additionalProperties": {"anyOf": [
        {"type": "string", "maxLength": 200, "pattern": TEXT_PATTERN},
        {"type": "number", "minimum": -MAX_HARDWARE_NUMBER, "maximum": MAX_HARDWARE_NUMBER},
        {"type": "boolean"},
    ]},
}

REGISTRATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["node_id"],
    "properties": {
        "node_id": NODE_ID,
        "display_name": {**TEXT_64, "description": "Shown on the leaderboard."},
        "owner": {**TEXT_64, "description": "Who lends the machine."},
        "hardware": {"$ref": "#/components/schemas/Hardware"},
    },
}

EVICTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["node_id"],
    "properties": {
        "node_id": NODE_ID,
        "job": {**JOB_NAME, "description": "Defaults to the coordinator's job."},
        "reason": {"type": "string", "maxLength": 200, "pattern": TEXT_PATTERN},
        "cooldown_seconds": {"type": "number", "minimum": 1, "maximum": 315360000,
                             "description": "How long the node stays out; "
                                            "omitted: for good."},
    },
}

REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "Contribution": CONTRIBUTION_SCHEMA,
    "RoundReport": REPORT_SCHEMA,
    "ReportBatch": REPORT_BATCH_SCHEMA,
    "Hardware": HARDWARE_SCHEMA,
    "Registration": REGISTRATION_SCHEMA,
    "Eviction": EVICTION_SCHEMA,
}

validate_batch = compile_schema(REPORT_BATCH_SCHEMA, REQUEST_SCHEMAS)
validate_registration = compile_schema(REGISTRATION_SCHEMA, REQUEST_SCHEMAS)
validate_eviction = compile_schema(EVICTION_SCHEMA, REQUEST_SCHEMAS)

#: (samples, staleness, param_version, accepted, reason): what reporters must agree on
Header = tuple[int, int, int, bool, "str | None"]


@dataclass(frozen=True, slots=True)
class Contribution:
    """One member's contribution header in one round."""

    node_id: str
    samples: int
    staleness: int
    param_version: int
    accepted: bool
    reason: str | None = None

    @property
    def header(self) -> Header:
        return (self.samples, self.staleness, self.param_version, self.accepted, self.reason)

    @property
    def credit(self) -> int:
        """Credit this header earns once attested: its samples if accepted, else 0."""
        return self.samples if self.accepted else 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": self.node_id, "samples": self.samples, "staleness": self.staleness,
            "param_version": self.param_version, "accepted": self.accepted}
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True, slots=True)
class RoundReport:
    """What one reporter saw in round (job, generation, round)."""

    job: str
    generation: int
    round: int
    members: tuple[str, ...]
    contributions: tuple[Contribution, ...]
    loss: float | None = None
    timestamp: float | None = None
    span: int = 1

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.job, self.generation, self.round)

    def headers(self) -> dict[str, Header]:
        return {c.node_id: c.header for c in self.contributions}

    def digest(self) -> str:
        """A fingerprint of the attested content (members, span and headers; not
        loss/timestamp)."""
        content: tuple[Any, ...] = (self.members,
                                    [(c.node_id, *c.header) for c in self.contributions])
        if self.span != 1:
            content += (self.span,)
        text = repr(content)
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job": self.job, "generation": self.generation, "round": self.round,
            "members": list(self.members),
            "contributions": [c.to_dict() for c in self.contributions]}
        if self.span != 1:
            out["span"] = self.span
        if self.loss is not None:
            out["loss"] = self.loss
        if self.timestamp is not None:
            out["timestamp"] = self.timestamp
        return out


def batch_json(node_id: str, reports: list[RoundReport]) -> bytes:
    """The body of `POST /api/v1/reports` for `reports` sent by `node_id`."""
    return json.dumps({"node_id": node_id, "reports": [r.to_dict() for r in reports]},
                      separators=(",", ":"), allow_nan=False).encode()


_NODE_RE = re.compile(NODE_ID_PATTERN[1:-1])
_JOB_RE = re.compile(JOB_PATTERN[1:-1])
_REASONS = frozenset(r.value for r in Reason)
_CONTRIBUTION_KEYS = frozenset(CONTRIBUTION_SCHEMA["properties"])
_CONTRIBUTION_REQUIRED = frozenset(CONTRIBUTION_SCHEMA["required"])
_REPORT_KEYS = frozenset(REPORT_SCHEMA["properties"])
_REPORT_REQUIRED = frozenset(REPORT_SCHEMA["required"])


def _int_in(value: Any, high: int) -> bool:
    return type(value) is int and 0 <= value <= high


def _number(value: Any) -> bool:
    return type(value) is int or (type(value) is float and math.isfinite(value))


def _plainly_valid(body: Any) -> bool:
    """A fast check that accepts only what the schema accepts (for plain, well-formed
    batches: ints as ints, ASCII ids). Anything else, valid or not, goes through the
    general validator, which also names the bad field."""
    if type(body) is not dict or body.keys() != {"node_id", "reports"}:
        return False
    node_id, batch = body["node_id"], body["reports"]
    if type(node_id) is not str or not _NODE_RE.fullmatch(node_id):
        return False
    if type(batch) is not list or not 1 <= len(batch) <= MAX_REPORTS_PER_BATCH:
        return False
    for report in batch:
        if type(report) is not dict:
            return False
        keys = report.keys()
        if not (_REPORT_REQUIRED <= keys <= _REPORT_KEYS):
            return False
        job, members, contributions = report["job"], report["members"], report["contributions"]
        if type(job) is not str or not _JOB_RE.fullmatch(job):
            return False
        if not _int_in(report["generation"], MAX_GENERATION) or \
                not _int_in(report["round"], MAX_ROUND):
            return False
        if type(members) is not list or not 1 <= len(members) <= MAX_MEMBERS:
            return False
        for member in members:
            if type(member) is not str or not _NODE_RE.fullmatch(member):
                return False
        if len(set(members)) != len(members):
            return False
        if type(contributions) is not list or not 1 <= len(contributions) <= MAX_MEMBERS:
            return False
        for c in contributions:
            if type(c) is not dict or not (_CONTRIBUTION_REQUIRED <= c.keys() <=
                                           _CONTRIBUTION_KEYS):
                return False
            node = c["node_id"]
            if type(node) is not str or not _NODE_RE.fullmatch(node):
                return False
            if not (_int_in(c["samples"], MAX_SAMPLES) and _int_in(c["staleness"], MAX_STALENESS)
                    and _int_in(c["param_version"], MAX_ROUND)
                    and type(c["accepted"]) is bool):
                return False
            if "reason" in c and (type(c["reason"]) is not str or c["reason"] not in _REASONS):
                return False
        if "span" in report and not (_int_in(report["span"], MAX_SPAN) and report["span"] >= 1):
            return False
        if "loss" in report and not (_number(report["loss"])
                                     and -MAX_LOSS <= report["loss"] <= MAX_LOSS):
            return False
        if "timestamp" in report and not (_number(report["timestamp"])
                                          and 0 <= report["timestamp"] <= MAX_TIMESTAMP):
            return False
    return True


def parse_batch(body: Any) -> tuple[str, list[RoundReport]]:
    """Validate a decoded batch body; returns (reporter node id, reports).

    Raises `ValidationError` (422) naming the first bad field: schema violations, a
    contribution list that does not name every member exactly once, or a reason that
    does not fit `accepted`.
    """
    if not _plainly_valid(body):
        body = validate_batch(body, "")
    reports = []
    for i, raw in enumerate(body["reports"]):
        path = f"reports[{i}]"
        members = tuple(raw["members"])
        contributions = []
        seen: set[str] = set()
        for j, c in enumerate(raw["contributions"]):
            cpath = f"{path}.contributions[{j}]"
            node = c["node_id"]
            if node in seen:
                raise ValidationError(f"{cpath}.node_id {node!r} appears twice; each member "
                                      "has exactly one header", field=f"{cpath}.node_id")
            seen.add(node)
            accepted = c["accepted"]
            reason = c.get("reason")
            if accepted and reason is not None:
                raise ValidationError(f"{cpath}.reason must be absent when accepted is true",
                                      field=f"{cpath}.reason")
            if not accepted and reason is None:
                raise ValidationError(f"{cpath}.reason is required when accepted is false",
                                      field=f"{cpath}.reason")
            contributions.append(Contribution(node, c["samples"], c["staleness"],
                                              c["param_version"], accepted, reason))
        if seen != set(members):
            missing = sorted(set(members) - seen)
            extra = sorted(seen - set(members))
            raise ValidationError(
                f"{path}.contributions must hold one header per member; "
                f"missing {missing}, not members {extra}", field=f"{path}.contributions")
        reports.append(RoundReport(raw["job"], raw["generation"], raw["round"], members,
                                   tuple(contributions), raw.get("loss"),
                                   raw.get("timestamp"), raw.get("span", 1)))
    return body["node_id"], reports
