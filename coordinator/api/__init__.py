"""The REST API: one blueprint per resource under /api/v1, and the helpers they share."""

from __future__ import annotations

import re

from flask import Flask, request

from coordinator.contract import NODE_ID_PATTERN
from coordinator.errors import ValidationError

API = "/api/v1"
_NODE_ID = re.compile(NODE_ID_PATTERN[1:-1])


def query_int(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"query parameter {name}={raw[:40]!r} must be an integer",
                              field=f"query.{name}") from None
    if not low <= value <= high:
        raise ValidationError(f"query parameter {name}={value} must lie between {low} and "
                              f"{high}", field=f"query.{name}")
    return value


def query_float(name: str, low: float, high: float) -> float | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValidationError(f"query parameter {name}={raw[:40]!r} must be a number",
                              field=f"query.{name}") from None
    if not low <= value <= high:  # also false for NaN
        raise ValidationError(f"query parameter {name}={raw[:40]!r} must lie between {low} "
                              f"and {high}", field=f"query.{name}")
    return value


def query_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = request.args.get(name, default)
    if raw not in choices:
        raise ValidationError(f"query parameter {name}={raw[:40]!r} must be one of "
                              f"{list(choices)}", field=f"query.{name}")
    return raw


def valid_node_id(node_id: str) -> bool:
    return bool(_NODE_ID.fullmatch(node_id))


def register_blueprints(app: Flask) -> None:
    from coordinator.api import credits, evictions, jobs, manifests, meta, nodes, reports

    for module in (nodes, reports, credits, jobs, evictions, meta, manifests):
        app.register_blueprint(module.bp)
