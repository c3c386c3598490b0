"""Request bodies of the coordinator's API as pydantic dataclasses: enforced and published.

The server validates every request body with these models (`coordinator.validation`),
and the OpenAPI description publishes the JSON Schema pydantic derives from the very
same models, so the description and the server cannot drift apart. Types are strict (a
JSON `true` is not an integer, `"12"` is not a number) and unknown fields are refused.
Rules that span fields (one header per member, a reason exactly when refused) are
checked after the models, in `coordinator.contract.parse_batch`.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, Strict, field_validator
from pydantic.dataclasses import dataclass

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


#: (samples, staleness, param_version, accepted, reason): what reporters must agree on
Header = tuple[int, int, int, bool, "str | None"]


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


def _int(low: int, high: int, description: str) -> Any:
    return Annotated[int, Strict(), Field(ge=low, le=high, description=description)]


def _number(low: float, high: float, description: str) -> Any:
    return Annotated[float, Strict(), Field(ge=low, le=high, allow_inf_nan=False,
                                            description=description)]


NodeId = Annotated[str, Strict(), Field(
    pattern=NODE_ID_PATTERN,
    description="A node id as registered in the rendezvous (1-128 characters).")]
JobName = Annotated[str, Strict(), Field(pattern=JOB_PATTERN, description="A job name.")]
Text64 = Annotated[str, Strict(), Field(max_length=64, pattern=TEXT_PATTERN)]


#: closed objects (unknown fields are refused) of strict fields (nothing is coerced: each
#: scalar is `Strict`; the objects themselves are not, so a parsed dict validates too)
#: (patterns run on pydantic's Rust engine: its `$` is the end of the text, as in the
#: published JSON Schema, where Python's `re` would also match before a final newline)
_STRICT = ConfigDict(extra="forbid", use_enum_values=True, hide_input_in_errors=True,
                     regex_engine="rust-regex")
#: plain slotted dataclasses once validated: the ledger reads their fields in its hot loop
body = dataclass(frozen=True, slots=True, kw_only=True, config=_STRICT)


@body
class Contribution:
    """One member's contribution header as the reporter saw it in the round."""

    node_id: NodeId
    samples: _int(0, MAX_SAMPLES, "Samples the gradient was computed on.")
    staleness: _int(0, MAX_STALENESS, "Round minus the parameter version it was computed on.")
    param_version: _int(0, MAX_ROUND, "Parameter version of the gradient.")
    accepted: Annotated[bool, Strict(), Field(
        description="Whether it entered the round's aggregate.")]
    reason: Annotated[Reason, Strict(False)] = Field(  # type: ignore[assignment]
        default=None,  # absent means None; an explicit null is refused
        description="Why not; required when accepted is false, absent when true.")

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


@body
class RoundReport:
    """What one reporter saw in one round (job, generation, round)."""

    job: JobName
    generation: _int(0, MAX_GENERATION, "Rendezvous generation id.")
    round: _int(0, MAX_ROUND, "Round number (the aggregate's version).")
    span: _int(1, MAX_SPAN, "Optional, default 1: the report covers rounds `round` to "
               "`round + span - 1` with the same members (consecutive synchronous steps "
               "reported together); samples are summed over them.") = 1
    members: Annotated[list[NodeId], AfterValidator(tuple)] = Field(
        min_length=1, max_length=MAX_MEMBERS, json_schema_extra={"uniqueItems": True},
        description="The round's members in rank order; must include the reporter.")
    contributions: Annotated[list[Contribution], AfterValidator(tuple)] = Field(
        min_length=1, max_length=MAX_MEMBERS, description="Exactly one header per member.")
    loss: _number(-MAX_LOSS, MAX_LOSS,  # type: ignore[assignment]
                  "Optional: the reporter's training loss in this round.") = None
    timestamp: _number(0, MAX_TIMESTAMP,  # type: ignore[assignment]
                       "Optional: wall-clock time (Unix seconds) the round closed at the "
                       "reporter; gives the report lag.") = None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.job, self.generation, self.round)

    def headers(self) -> dict[str, Header]:
        return {c.node_id: c.header for c in self.contributions}

    def digest(self) -> str:
        """A fingerprint of the attested content (members, span and headers; not
        loss/timestamp)."""
        content: tuple[Any, ...] = (tuple(self.members),
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


@body
class ReportBatch:
    """The body of `POST /api/v1/reports`."""

    node_id: NodeId = Field(description="The reporter; the bearer token must be its.")
    reports: list[RoundReport] = Field(min_length=1, max_length=MAX_REPORTS_PER_BATCH)


HardwareValue = (Annotated[str, Strict(), Field(max_length=200, pattern=TEXT_PATTERN)]
                 | Annotated[bool, Strict()]
                 | Annotated[int, Strict(), Field(ge=-MAX_HARDWARE_NUMBER,
                                                  le=MAX_HARDWARE_NUMBER)]
                 | Annotated[float, Strict(), Field(ge=-MAX_HARDWARE_NUMBER,
                                                    le=MAX_HARDWARE_NUMBER,
                                                    allow_inf_nan=False)])
Hardware = Annotated[dict[str, HardwareValue], Field(
    max_length=32, description="Free-form facts about the node (gpu, gpu_memory_gb, cpu, ...).")]


@body
class Registration:
    """The body of `POST /api/v1/nodes`."""

    node_id: NodeId
    display_name: Text64 = Field(default="", description="Shown on the leaderboard.")
    owner: Text64 = Field(default="", description="Who lends the machine.")
    hardware: Hardware = Field(default_factory=dict)
    token: str | None = Field(
        default=None, min_length=47, max_length=128, pattern=r"^hrd_[A-Za-z0-9_-]+$",
        description="The node's own token (hrd_ and at least 43 random URL-safe characters). "
                    "Optional: the coordinator issues one when it is left out. With it, "
                    "registering again with the same token answers 201 again, so a "
                    "registration whose answer was lost can be retried on another "
                    "coordinator.")

    @field_validator("hardware")
    @classmethod
    def _text_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"hardware key {key!r} is not valid Unicode text") from None
        return value


@body
class Eviction:
    """The body of `POST /api/v1/evictions`."""

    node_id: NodeId
    job: JobName = Field(default=None,  # type: ignore[assignment]
                         description="Defaults to the coordinator's job.")
    reason: Annotated[str, Strict(), Field(  # type: ignore[assignment]
        max_length=200, pattern=TEXT_PATTERN)] = None
    cooldown_seconds: _number(1, 315360000, "How long the node stays out; "  # type: ignore
                              "omitted: for good.") = None


#: the request bodies, by the name the OpenAPI description gives their schema
REQUEST_MODELS: dict[str, type] = {
    "ReportBatch": ReportBatch,
    "Registration": Registration,
    "Eviction": Eviction,
}
