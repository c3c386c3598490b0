"""The report contract between training workers and the coordinator.

A worker registers its node once (`POST /api/v1/nodes`) and keeps the token it gets.
After every round it queues one `RoundReport`: what *it* saw in that round's collective
(every member's contribution header), and sends the queue in batches
(`POST /api/v1/reports`, `{"node_id": ..., "reports": [...]}`) from a background thread.
See docs/coordinator.md for the credit rules built on it.

The bodies are pydantic models (`coordinator.models`): the server validates with them and
the OpenAPI description publishes their JSON Schemas. `parse_batch` adds the rules that
span fields; a client may build the models and send them with `batch_json`.
"""

from __future__ import annotations

import json

from coordinator.errors import ValidationError
from coordinator.models import (  # noqa: F401 - the contract's names, re-exported
    JOB_PATTERN,
    MAX_GENERATION,
    MAX_HARDWARE_NUMBER,
    MAX_LOSS,
    MAX_MEMBERS,
    MAX_REPORTS_PER_BATCH,
    MAX_ROUND,
    MAX_SAFE_INT,
    MAX_SAMPLES,
    MAX_SPAN,
    MAX_STALENESS,
    MAX_TIMESTAMP,
    NODE_ID_PATTERN,
    REQUEST_MODELS,
    TEXT_PATTERN,
    Contribution,
    Eviction,
    Header,
    Reason,
    Registration,
    ReportBatch,
    RoundReport,
)

#: agreed refusals that count as a strike against the contributing node
STRIKE_REASONS = frozenset({Reason.NONFINITE.value, Reason.OUTLIER.value})


def batch_json(node_id: str, reports: list[RoundReport]) -> bytes:
    """The body of `POST /api/v1/reports` for `reports` sent by `node_id`."""
    return json.dumps({"node_id": node_id, "reports": [r.to_dict() for r in reports]},
                      separators=(",", ":"), allow_nan=False).encode()


def parse_batch(body: ReportBatch) -> tuple[str, list[RoundReport]]:
    """Check the rules of a validated batch that span fields; returns (reporter, reports).

    Raises `ValidationError` (422) naming the first bad field: a member listed twice, a
    contribution list that does not name every member exactly once, or a reason that
    does not fit `accepted`.
    """
    for i, report in enumerate(body.reports):
        path = f"reports[{i}]"
        members = report.members
        if len(set(members)) != len(members):
            seen_members: set[str] = set()
            for k, member in enumerate(members):
                if member in seen_members:
                    raise ValidationError(f"{path}.members[{k}] {member!r} is listed twice; "
                                          "members must be unique", field=f"{path}.members[{k}]")
                seen_members.add(member)
        seen: set[str] = set()
        for j, c in enumerate(report.contributions):
            cpath = f"{path}.contributions[{j}]"
            if c.node_id in seen:
                raise ValidationError(f"{cpath}.node_id {c.node_id!r} appears twice; each "
                                      "member has exactly one header", field=f"{cpath}.node_id")
            seen.add(c.node_id)
            if c.accepted and c.reason is not None:
                raise ValidationError(f"{cpath}.reason must be absent when accepted is true",
                                      field=f"{cpath}.reason")
            if not c.accepted and c.reason is None:
                raise ValidationError(f"{cpath}.reason is required when accepted is false",
                                      field=f"{cpath}.reason")
        if seen != set(members):
            missing = sorted(set(members) - seen)
            extra = sorted(seen - set(members))
            raise ValidationError(
                f"{path}.contributions must hold one header per member; "
                f"missing {missing}, not members {extra}", field=f"{path}.contributions")
    return body.node_id, list(body.reports)
