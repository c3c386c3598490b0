"""A thin adapter between Flask and pydantic: request bodies in, the API's errors out.

`validate_body(Model)` checks the content type (415), reads the body (Werkzeug answers
413 past the limit) and validates it against `Model` straight from the JSON bytes, the
fast path. Only a body that fails is parsed again with the standard library, to answer
malformed JSON with 400 (NaN, 5000-digit integers, bad UTF-8 included) and anything else
with 422 naming the first bad field as `reports[0].contributions[1].samples`.
`openapi_schemas()` gives the JSON Schemas pydantic derives from the same models.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, TypeVar

from flask import request
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticError
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from coordinator.errors import MalformedJson, UnsupportedMediaType, ValidationError

Model = TypeVar("Model")

REF_TEMPLATE = "#/components/schemas/{model}"
# pydantic names the member of a union that refused a value in the error location
_UNION_TAG = re.compile(r"^(constrained-)?(str|bool|int|float)$|^function-")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(data: bytes) -> Any:
    """The standard library's reading of a body; MalformedJson (400) when it is not JSON."""
    try:
        text = data.decode("utf-8")
        return json.loads(text, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise MalformedJson(f"the body is not UTF-8 text: {exc.reason} at byte "
                            f"{exc.start}") from None
    except json.JSONDecodeError as exc:
        raise MalformedJson(f"malformed JSON: {exc.msg} at line {exc.lineno} column "
                            f"{exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise MalformedJson(f"malformed JSON: {exc}") from None


def request_bytes() -> bytes:
    """The request's body, once the content type says JSON (415 otherwise)."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"the body must be JSON sent as 'Content-Type: application/json', "
            f"not {request.content_type or 'no content type'!r}")
    return request.get_data(cache=False)  # Werkzeug answers 413 past MAX_CONTENT_LENGTH


def validate_body(model: type[Model]) -> Model:
    """The request body as a `model` instance, or the API's 415/413/400/422 error."""
    return validate_bytes(model, request_bytes())


@functools.cache
def adapter(model: type[Model]) -> TypeAdapter[Model]:
    """pydantic's validator (and schema generator) for `model`, built once."""
    return TypeAdapter(model)


def validate_bytes(model: type[Model], data: bytes) -> Model:
    """`data` as a `model` instance, or MalformedJson (400) / ValidationError (422)."""
    validator = adapter(model)
    try:
        return validator.validate_json(data)
    except PydanticError:
        pass
    value = parse_json(data)  # 400 for what the standard library does not read as JSON
    try:
        return validator.validate_python(value)
    except PydanticError as exc:
        raise as_api_error(exc) from None


def field_path(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as the API names fields: `reports[0].members[2]`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _UNION_TAG.match(part):
            break
        else:
            path += f".{part}" if path else part
    return path or None


def as_api_error(exc: PydanticError) -> ValidationError:
    """The first problem pydantic found, as a 422 that names the field."""
    first = exc.errors(include_url=False, include_input=False)[0]
    field = field_path(first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "is not a known field (unknown fields are refused)"
    elif first["type"] == "missing":
        message = "is required"
    where = field or "the body"
    return ValidationError(f"{where}: {message}", field=field)


class OpenApi30Schema(GenerateJsonSchema):
    """pydantic's JSON Schema in the dialect of OpenAPI 3.0: a value that may be null is
    `nullable: true` (3.0 has no `null` type) and a single allowed value is a one-item
    `enum` (3.0 has no `const`)."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        if "$ref" in inner:  # 3.0 ignores keywords beside a $ref
            return {"allOf": [inner], "nullable": True}
        return {**inner, "nullable": True}

    def literal_schema(self, schema: core_schema.LiteralSchema) -> JsonSchemaValue:
        result = super().literal_schema(schema)
        if "const" in result:
            result["enum"] = [result.pop("const")]
        return result


def openapi_schemas(models: dict[str, type]) -> dict[str, Any]:
    """The JSON Schemas of `models` and of everything they refer to, keyed as the OpenAPI
    `components.schemas` wants them (OpenAPI 3.0: no `null` types are used)."""
    _, top = TypeAdapter.json_schemas(
        [(name, "validation", adapter(model)) for name, model in models.items()],
        ref_template=REF_TEMPLATE, schema_generator=OpenApi30Schema)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    for name, model in models.items():
        schemas[name] = schemas.pop(model.__name__, schemas.get(name))
    return _without_null_defaults(schemas)


def _without_null_defaults(node: Any) -> Any:
    """Drop `"default": null` (an absent optional field): OpenAPI 3.0 has no null type."""
    if isinstance(node, dict):
        return {k: _without_null_defaults(v) for k, v in node.items()
                if not (k == "default" and v is None)}
    if isinstance(node, list):
        return [_without_null_defaults(v) for v in node]
    return node
