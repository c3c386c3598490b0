"""The wire format of a staleness round: one message per member, gathered by one allgather.

A message is a length-prefixed JSON header, then the payload bytes (the codec's), both
padded to 8 bytes so that, concatenated by the allgather, every payload stays aligned for
viewing as float/int32 without a copy. The header says who sent it and what it carries:

    {"node", "rank", "round", "codec": codec tag, "finishing": bool,
     "contribs": [[samples, parameter version], ...], "step_time": seconds,
     "parts": [bytes per contribution] (codecs that encode each gradient), "payload_bytes"}

Every field a round reads is checked (`checked`) before use: a peer's garbage costs it a
strike, never the generation. Node and rank are not trusted: a member is who the
generation places at its rank.
"""

from __future__ import annotations

import json
import struct

import torch

__all__ = ["pack", "unpack", "checked"]

_HEADER = struct.Struct("<I")
_ALIGN = 8


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def pack(header: dict, payload: torch.Tensor) -> torch.Tensor:
    """One member's message: a length-prefixed JSON header, then the payload bytes.

    Header and payload are padded to 8 bytes so that, concatenated by an allgather,
    every payload stays aligned for viewing as float/int32 without a copy.
    """
    header = {**header, "payload_bytes": int(payload.numel())}
    raw = json.dumps(header, separators=(",", ":")).encode()
    head_len = _padded(_HEADER.size + len(raw))
    message = torch.zeros(head_len + _padded(payload.numel()), dtype=torch.uint8)
    head = _HEADER.pack(len(raw)) + raw
    message[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    if payload.numel():
        message[head_len:head_len + payload.numel()] = payload
    return message


def unpack(message: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Inverse of `pack`; the payload is a view into `message`."""
    if message.numel() < _HEADER.size:
        raise ValueError(f"a message of {message.numel()} bytes has no header")
    (length,) = _HEADER.unpack(bytes(message[:_HEADER.size].tolist()))
    header = json.loads(bytes(message[_HEADER.size:_HEADER.size + length].tolist()))
    if not isinstance(header, dict):
        raise ValueError(f"the header is {type(header).__name__}, not an object")
    start = _padded(_HEADER.size + length)
    size = header.get("payload_bytes", 0)
    if type(size) is not int or not 0 <= size <= message.numel() - start:
        raise ValueError(f"payload_bytes {size!r} does not fit the {message.numel()}-byte message")
    return header, message[start:start + size]


def checked(header: dict, payload: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """A peer's header with the fields the rounds read checked for type and range;
    ValueError names the first bad one."""
    contribs = header.get("contribs", [])
    if not isinstance(contribs, list) or not all(
            isinstance(c, list) and len(c) == 2 and all(type(x) is int for x in c)
            and c[0] >= 0 for c in contribs):
        raise ValueError("contribs must be a list of [samples >= 0, version] integer pairs")
    parts = header.get("parts")
    if parts is not None and (
            not isinstance(parts, list) or len(parts) != len(contribs)
            or not all(type(n) is int and n >= 0 for n in parts)
            or sum(parts) != payload.numel()):
        raise ValueError(f"parts must give the payload's {payload.numel()} bytes as one "
                         f"size >= 0 per contribution ({len(contribs)})")
    step_time = header.get("step_time", 0.0)
    if type(step_time) not in (int, float) or not 0.0 <= step_time < 1e6:
        raise ValueError(f"step_time {step_time!r} is not a duration in seconds")
    if not isinstance(header.get("finishing", False), bool):
        raise ValueError("finishing must be true or false")
    return header, payload
