"""A small JSON Schema (OpenAPI 3.0 subset) compiler: one schema, two uses.

The request schemas in `coordinator.contract` are published in the OpenAPI description
and enforced by validators compiled from the very same dicts, so the description and
the server cannot drift apart. Supported keywords: type, properties, required,
additionalProperties, maxProperties, items, minItems, maxItems, uniqueItems, enum,
minimum, maximum, minLength, maxLength, pattern (anchored `^...$`), anyOf, nullable,
$ref (to `#/components/schemas/...`); documentation keywords are ignored.

A validator returns the value (integral floats such as `3.0` become `int`, as JSON
Schema counts them as integers) or raises `ValidationError` naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from coordinator.errors import ValidationError

Validator = Callable[[Any, str], Any]

_IGNORED = {"description", "title", "example", "examples", "format", "default",
            "readOnly", "writeOnly", "deprecated", "externalDocs"}
_JSON_TYPES = {
    bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
    dict: "object", type(None): "null",
}


def _kind(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _where(path: str) -> str:
    return path or "the body"


def check_text(value: str, path: str) -> str:
    """Reject strings that cannot be stored as UTF-8 (lone surrogates from `\\ud800`)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValidationError(
                f"{_where(path)} contains a lone surrogate (\\u{ord(value[exc.start]):04x}), "
                "which is not valid Unicode text", field=path or None) from None
    return value


def compile_schema(schema: Mapping[str, Any],
                   components: Mapping[str, Mapping[str, Any]] | None = None) -> Validator:
    """Compile `schema` into a validator `(value, path) -> value`."""
    components = components or {}
    cache: dict[str, Validator] = {}

    def build(node: Mapping[str, Any]) -> Validator:
        fused = _fused(node, build)
        if fused is not None:
            return fused
        if "$ref" in node:
            ref = node["$ref"]
            name = ref.rsplit("/", 1)[-1]
            if not ref.startswith("#/components/schemas/") or name not in components:
                raise ValueError(f"unresolvable $ref {ref!r}")
            if name not in cache:
                slot: list[Validator] = []
                cache[name] = lambda v, p: slot[0](v, p)
                slot.append(build(components[name]))
                cache[name] = slot[0]
            return cache[name]
        unknown = set(node) - _IGNORED - {
            "type", "properties", "required", "additionalProperties", "maxProperties",
            "items", "minItems", "maxItems", "uniqueItems", "enum", "minimum", "maximum",
            "minLength", "maxLength", "pattern", "anyOf", "nullable"}
        if unknown:
            raise ValueError(f"schema keywords {sorted(unknown)} are not supported")
        checks: list[Validator] = []
        kind = node.get("type")
        nullable = bool(node.get("nullable"))
        if kind is not None:
            checks.append(_type_check(kind))
        if kind == "object" or "properties" in node:
            checks.append(_object_check(node, build))
        if kind == "array" or "items" in node:
            checks.append(_array_check(node, build))
        if kind == "string" or any(k in node for k in ("minLength", "maxLength", "pattern")):
            checks.append(_string_check(node))
        if "minimum" in node or "maximum" in node:
            checks.append(_range_check(node))
        if "enum" in node:
            allowed = list(node["enum"])

            def enum_check(value: Any, path: str) -> Any:
                if not any(a == value and isinstance(a, bool) == isinstance(value, bool)
                           for a in allowed):
                    raise ValidationError(
                        f"{_where(path)} must be one of {allowed}, not {value!r}",
                        field=path or None)
                return value
            checks.append(enum_check)
        if "anyOf" in node:
            options = [build(option) for option in node["anyOf"]]

            def any_of(value: Any, path: str) -> Any:
                errors = []
                for option in options:
                    try:
                        return option(value, path)
                    except ValidationError as exc:
                        errors.append(exc.message)
                raise ValidationError(
                    f"{_where(path)} matches none of the allowed forms: " + "; ".join(errors),
                    field=path or None)
            checks.append(any_of)

        def validate(value: Any, path: str) -> Any:
            if value is None:
                if nullable:
                    return None
                if kind is not None:
                    raise ValidationError(f"{_where(path)} must be {_article(kind)}, not null",
                                          field=path or None)
            for check in checks:
                value = check(value, path)
            return value
        return validate

    return build(schema)


def _article(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _type_check(kind: str) -> Validator:
    def check(value: Any, path: str) -> Any:
        actual = type(value)
        if kind == "integer":
            if actual is int:
                return value
            if actual is float and math.isfinite(value) and value.is_integer():
                return int(value)
        elif kind == "number":
            if actual is int:
                return value
            if actual is float:
                if not math.isfinite(value):
                    raise ValidationError(f"{_where(path)} must be a finite number",
                                          field=path or None)
                return value
        elif kind == "string" and actual is str:
            return check_text(value, path)
        elif (kind == "boolean" and actual is bool) or (kind == "array" and actual is list) \
                or (kind == "object" and actual is dict):
            return value
        raise ValidationError(f"{_where(path)} must be {_article(kind)}, not {_kind(value)}",
                              field=path or None)
    return check


def _object_check(node: Mapping[str, Any], build: Callable[[Mapping[str, Any]], Validator]
                  ) -> Validator:
    props = {name: build(sub) for name, sub in node.get("properties", {}).items()}
    required = list(node.get("required", ()))
    extra = node.get("additionalProperties", True)
    extra_check = build(extra) if isinstance(extra, Mapping) else None
    max_props = node.get("maxProperties")

    def check(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            return value
        for name in required:
            if name not in value:
                field = f"{path}.{name}" if path else name
                raise ValidationError(f"{field} is required", field=field)
        if max_props is not None and len(value) > max_props:
            raise ValidationError(
                f"{_where(path)} has {len(value)} properties; at most {max_props} are allowed",
                field=path or None)
        out = {}
        for name, item in value.items():
            check_text(name, path)
            field = f"{path}.{name}" if path else name
            validator = props.get(name)
            if validator is None:
                if extra is False:
                    raise ValidationError(f"{field} is not a known property", field=field)
                if extra_check is not None:
                    item = extra_check(item, field)
            else:
                item = validator(item, field)
            out[name] = item
        return out
    return check


def _array_check(node: Mapping[str, Any], build: Callable[[Mapping[str, Any]], Validator]
                 ) -> Validator:
    items = build(node["items"]) if "items" in node else None
    low = node.get("minItems", 0)
    high = node.get("maxItems")
    unique = bool(node.get("uniqueItems"))

    def check(value: Any, path: str) -> Any:
        if not isinstance(value, list):
            return value
        if len(value) < low:
            raise ValidationError(f"{_where(path)} needs at least {low} item(s), has {len(value)}",
                                  field=path or None)
        if high is not None and len(value) > high:
            raise ValidationError(f"{_where(path)} has {len(value)} items; at most {high} "
                                  "are allowed", field=path or None)
        if items is not None:
            value = [items(item, f"{path}[{i}]") for i, item in enumerate(value)]
        if unique:
            seen: set[Any] = set()
            for i, item in enumerate(value):
                key = _hashable(item)
                if key in seen:
                    raise ValidationError(f"{path}[{i}] repeats an earlier item ({item!r}); "
                                          "items must be unique", field=f"{path}[{i}]")
                seen.add(key)
        return value
    return check


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return ("o", tuple(sorted((k, _hashable(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("a", tuple(_hashable(v) for v in value))
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    return ("s", value)


def _string_check(node: Mapping[str, Any]) -> Validator:
    low = node.get("minLength", 0)
    high = node.get("maxLength")
    pattern = node.get("pattern")
    regex = None
    if pattern is not None:
        if not (pattern.startswith("^") and pattern.endswith("$")):
            raise ValueError(f"pattern {pattern!r} must be anchored as ^...$")
        # Full match on the inner expression: Python's `$` also matches before a final
        # newline, ECMA-262's (which JSON Schema means) does not.
        regex = re.compile(pattern[1:-1])

    def check(value: Any, path: str) -> Any:
        if not isinstance(value, str):
            return value
        if len(value) < low:
            raise ValidationError(f"{_where(path)} must have at least {low} character(s)",
                                  field=path or None)
        if high is not None and len(value) > high:
            raise ValidationError(f"{_where(path)} has {len(value)} characters; at most "
                                  f"{high} are allowed", field=path or None)
        if regex is not None and not regex.fullmatch(value):
            shown = value if len(value) <= 80 else value[:77] + "..."
            raise ValidationError(f"{_where(path)} {shown!r} does not match {pattern}",
                                  field=path or None)
        return value
    return check


def _range_check(node: Mapping[str, Any]) -> Validator:
    low = node.get("minimum")
    high = node.get("maximum")

    def check(value: Any, path: str) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValidationError(
                f"{_where(path)} is {value!r}; it must lie between {low} and {high}",
                field=path or None)
        return value
    return check


_SIMPLE = {"integer", "number", "boolean", "string", "array", "object"}


def _fused(node: Mapping[str, Any], build: Callable[[Mapping[str, Any]], Validator]
           ) -> Validator | None:
    """One closure for a plain typed schema (the common case, and the hot path of report
    validation); None for what the general composition handles ($ref, anyOf, enum of a
    non-string). Same rules and messages as the general path."""
    kind = node.get("type")
    if kind not in _SIMPLE or "$ref" in node or "anyOf" in node or node.get("nullable") \
            or ("enum" in node and kind != "string"):
        return None
    type_check = _type_check(kind)
    if kind in ("integer", "number"):
        low, high = node.get("minimum"), node.get("maximum")
        is_int = kind == "integer"

        def number(value: Any, path: str) -> Any:
            if type(value) is not int or not is_int:
                value = type_check(value, path)
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValidationError(
                    f"{_where(path)} is {value!r}; it must lie between {low} and {high}",
                    field=path or None)
            return value
        return number
    if kind == "boolean":
        def boolean(value: Any, path: str) -> Any:
            if type(value) is not bool:
                type_check(value, path)
            return value
        return boolean
    if kind == "string":
        rest = _string_check(node)
        allowed = node.get("enum")

        def string(value: Any, path: str) -> Any:
            if type(value) is not str:
                type_check(value, path)
            check_text(value, path)
            if allowed is not None and value not in allowed:
                raise ValidationError(f"{_where(path)} must be one of {list(allowed)}, "
                                      f"not {value!r}", field=path or None)
            return rest(value, path)
        return string
    if kind == "array":
        body = _array_check(node, build)

        def array(value: Any, path: str) -> Any:
            if type(value) is not list:
                type_check(value, path)
            return body(value, path)
        return array
    obj = _object_check(node, build)

    def mapping(value: Any, path: str) -> Any:
        if type(value) is not dict:
            type_check(value, path)
        return obj(value, path)
    return mapping
