"""Coordinator errors and the JSON error body every 4xx/5xx answer carries.

Every error answer is `{"error": {"code": "<machine code>", "message": "<sentence>"}}`,
plus `"field": "<JSON path>"` for a validation error, so a client can tell a malformed
request (fix the client) from a refusal (do not retry) from an outage (retry later).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from rendezvous.errors import HordeError

logger = logging.getLogger(__name__)


class CoordinatorError(HordeError):
    """Root of the coordinator's own errors."""


class ApiError(CoordinatorError):
    """An error answered to the client with `status` and a JSON body."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class MalformedJson(ApiError):
    status, code = 400, "malformed_json"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="horde"'})


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class EtcdAuthOff(ApiError):
    """The job runs without etcd authentication, so there are no etcd credentials."""

    status, code = 409, "etcd_auth_off"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class ValidationError(ApiError):
    status, code = 422, "invalid"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
    411: "length_required", 413: "payload_too_large", 414: "uri_too_long",
    415: "unsupported_media_type", 416: "range_not_satisfiable", 422: "invalid",
    429: "too_many_requests", 431: "headers_too_large",
}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    response = jsonify({"error": error})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Answer every error, ours or Werkzeug's, with the JSON error body; never leak a trace."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "error")
        if status == 413:
            message = (f"request body exceeds the limit of "
                       f"{app.config.get('MAX_CONTENT_LENGTH')} bytes")
        else:
            message = exc.description or exc.name
        headers = {}
        if status == 405 and exc.response is None:
            allowed = getattr(exc, "valid_methods", None)
            if allowed:
                headers["Allow"] = ", ".join(sorted(allowed))
        return error_response(status, code, message, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        logger.exception("unexpected error while serving a request")
        return error_response(500, "internal", "internal error; the coordinator logged it")
