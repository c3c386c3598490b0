"""Validation of every value the rendezvous reads back from etcd.

Anyone who can reach etcd can write any key, so a value read back is hostile until it
is checked here: it must be JSON of the expected shape, with numbers in range and
strings short and printable. `parse_*` raise `InvalidRecordError` naming what was wrong;
`read_record` turns that into one warning per bad key version and returns None, so a
reader skips the value and goes on (a malformed key is never fatal). The pydantic models
below are the wire schema; the frozen dataclasses in `rendezvous.generation` stay the
records the rest of the code uses.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rendezvous.errors import RendezvousError

logger = logging.getLogger(__name__)

#: Largest value read as a record (bytes); a generation of 10,000 members fits.
MAX_RECORD_BYTES = 4 * 1024 * 1024
#: Largest node registration, blacklist entry, status or reset request (bytes).
MAX_SMALL_RECORD_BYTES = 64 * 1024
#: Largest leader or leaving value (bytes): a node id or a short reason.
MAX_TEXT_BYTES = 1024
MAX_MEMBERS = 100_000
MAX_LEASE = 2**63 - 1
MAX_GENERATION = 2**53
MAX_SLOTS = 4096
MAX_WALL_TIME = 1e11  # seconds since the epoch (year 5138)

#: A node id: it names a key, so no "/", no spaces and no control characters.
NODE_ID = re.compile(r"[^\s/\x00-\x1f\x7f]{1,256}")
#: A host name or an IP address (IPv6 with or without brackets, with a zone).
HOST = re.compile(r"[A-Za-z0-9._:%\-\[\]]{1,255}")


class InvalidRecordError(RendezvousError, ValueError):
    """A value read from etcd is not the record its key should hold."""


def _printable(text: str, limit: int) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


NodeId = Annotated[str, Field(pattern=f"^{NODE_ID.pattern}$")]
Host = Annotated[str, Field(pattern=f"^{HOST.pattern}$")]
Port = Annotated[int, Field(ge=1, le=65535)]
WallTime = Annotated[float, Field(ge=0, le=MAX_WALL_TIME, allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=4096)]


class _Wire(BaseModel):
    # strict: "5" is not 5 and true is not 1; unknown fields are ignored, so a newer
    # writer may add one, but they never reach the records.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class NodeInfoWire(_Wire):
    node_id: NodeId
    host: Host
    addr: Host
    store_port: Port
    slots: Annotated[int, Field(ge=1, le=MAX_SLOTS)] = 1
    pid: Annotated[int, Field(ge=0, le=2**32)] = 0
    lease: Annotated[int, Field(ge=0, le=MAX_LEASE)] = 0
    registered_at: WallTime = 0.0
    order: Annotated[int, Field(ge=-(2**31), le=2**31)] = 0
    hardware: dict[Annotated[str, Field(max_length=256)], Any] = Field(default_factory=dict)
    batch: Annotated[str, Field(max_length=256)] = ""
    batch_size: Annotated[int, Field(ge=1, le=MAX_MEMBERS)] = 1
    reachable: bool = True

    @field_validator("hardware")
    @classmethod
    def _small_hardware(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > 64:
            raise ValueError(f"hardware has {len(value)} entries (at most 64)")
        return value


class MemberWire(_Wire):
    node_id: NodeId
    host: Host
    addr: Host
    slots: Annotated[int, Field(ge=1, le=MAX_SLOTS)] = 1
    lease: Annotated[int, Field(ge=0, le=MAX_LEASE)] = 0
    reachable: bool = True


class GenerationWire(_Wire):
    id: Annotated[int, Field(ge=0, le=MAX_GENERATION)]
    members: Annotated[list[MemberWire], Field(min_length=1, max_length=MAX_MEMBERS)]
    store_host: Host
    store_port: Port
    reason: Text = ""
    created_at: WallTime = 0.0
    #: HOST:PORT of the relay hub, or "" (direct Gloo)
    relay: Annotated[str, Field(pattern=f"^(|{HOST.pattern}:[0-9]{{1,5}})$")] = ""

    @field_validator("members")
    @classmethod
    def _unique(cls, members: list[MemberWire]) -> list[MemberWire]:
        ids = [m.node_id for m in members]
        if len(set(ids)) != len(ids):
            dup = next(n for n in ids if ids.count(n) > 1)
            raise ValueError(f"member {dup!r} is listed twice")
        return members


class BlacklistWire(_Wire):
    node_id: Annotated[str, Field(min_length=1, max_length=256)]
    reason: Text
    until: Annotated[float, Field(ge=0, allow_inf_nan=False)] | Literal["inf"]
    count: Annotated[int, Field(ge=1, le=10**6)] = 1


class StatusWire(_Wire):
    state: Literal["running", "finished", "failed"]
    message: Text = ""


class ResetWire(_Wire):
    generation: Annotated[int, Field(ge=0, le=MAX_GENERATION)]
    by: Annotated[str, Field(max_length=256)] = ""


class ReadyWire(_Wire):
    """A node's readiness (`ready/<node>`): ready for the generation after `generation`;
    `reset`: the collective of that generation failed and the leader should say so."""

    generation: Annotated[int, Field(ge=0, le=MAX_GENERATION)]
    reset: bool = False


class JobConfigWire(_Wire):
    """The job's settings as the launcher that started it published them (`config`)."""

    rendezvous: dict[Annotated[str, Field(pattern=r"^HORDE_[A-Z0-9_]{1,64}$")],
                     Annotated[str, Field(max_length=4096)]]
    HORDE_COORDINATOR: Annotated[str, Field(max_length=2048)] | None = None
    HORDE_COLLECTIVE_TIMEOUT: Annotated[str, Field(max_length=64)]
    HORDE_RESET_LIMIT: Annotated[str, Field(max_length=64)] = ""

    @field_validator("rendezvous", "HORDE_COORDINATOR", "HORDE_COLLECTIVE_TIMEOUT",
                     "HORDE_RESET_LIMIT")
    @classmethod
    def _no_control_chars(cls, value: Any) -> Any:
        texts = value.values() if isinstance(value, dict) else [value or ""]
        for text in texts:
            if any(not c.isprintable() for c in text):
                raise ValueError("contains control characters")
        return value


M = TypeVar("M", bound=_Wire)


def _validate(model: type[M], data: bytes, what: str, limit: int = MAX_SMALL_RECORD_BYTES
              ) -> M:
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRecordError(f"{what} is not bytes")
    if len(data) > limit:
        raise InvalidRecordError(f"{what} is {len(data)} bytes (at most {limit})")
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
            for err in exc.errors(include_url=False)[:3])
        raise InvalidRecordError(f"{what} is not valid: {_printable(problems, 400)}") from None


def parse_node_info(data: bytes) -> Any:
    """A node registration (`nodes/<id>`) as a `NodeInfo`."""
    from rendezvous.generation import NodeInfo

    wire = _validate(NodeInfoWire, data, "node registration")
    return NodeInfo(**wire.model_dump())


def parse_generation(data: bytes) -> Any:
    """The generation record (`control/generation`) as a `Generation`."""
    from rendezvous.generation import Generation, Member

    wire = _validate(GenerationWire, data, "generation", MAX_RECORD_BYTES)
    raw = wire.model_dump()
    raw["members"] = tuple(Member(**m) for m in raw["members"])
    return Generation(**raw)


def parse_blacklist_entry(data: bytes) -> Any:
    """A blacklist entry (`blacklist/<id>`) as a `BlacklistEntry`."""
    from rendezvous.generation import BlacklistEntry

    wire = _validate(BlacklistWire, data, "blacklist entry")
    raw = wire.model_dump()
    raw["until"] = float(raw["until"])
    return BlacklistEntry(**raw)


def parse_status(data: bytes) -> Any:
    """The job status (`control/status`) as a `JobStatus`."""
    from rendezvous.generation import JobStatus

    return JobStatus(**_validate(StatusWire, data, "job status").model_dump())


def parse_reset(data: bytes) -> int:
    """The generation a reset request (`control/reset`) is about."""
    return _validate(ResetWire, data, "reset request").generation


def parse_ready(data: bytes) -> tuple[int, bool]:
    """A node's readiness marker (`ready/<node>`): (generation, reset requested)."""
    wire = _validate(ReadyWire, data, "readiness marker")
    return wire.generation, wire.reset


def parse_job_config(data: bytes) -> dict[str, Any]:
    """The job's published settings (`config`) as a dict of strings."""
    return _validate(JobConfigWire, data, "job config").model_dump()


def parse_text(data: bytes, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """A short UTF-8 text value (the leader's node id, a leaving reason)."""
    if len(data) > limit:
        raise InvalidRecordError(f"{what} is {len(data)} bytes (at most {limit})")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRecordError(f"{what} is not UTF-8 text") from None
    if not text.isprintable():
        raise InvalidRecordError(f"{what} contains control characters")
    return text


def node_id_of(key: str, prefix: str) -> str | None:
    """The node id a key under `prefix` names, or None when it is not a valid node id."""
    name = key[len(prefix):]
    return name if NODE_ID.fullmatch(name) else None


# -- logging each bad value once -------------------------------------------------------

_seen: OrderedDict[tuple[str, int, str], None] = OrderedDict()
_seen_lock = threading.Lock()
_SEEN_MAX = 4096


def report_invalid(key: str, mod_revision: int, problem: str) -> None:
    """Log that the value of `key` (at `mod_revision`) was ignored, once per version."""
    marker = (key, int(mod_revision), problem)
    with _seen_lock:
        if marker in _seen:
            return
        _seen[marker] = None
        while len(_seen) > _SEEN_MAX:
            _seen.popitem(last=False)
    logger.warning("rendezvous: ignoring etcd key %s (revision %d): %s; it was not written by "
                   "a Horde agent of this version, or someone wrote it by hand",
                   _printable(key, 300), mod_revision, problem)


T = TypeVar("T")


def read_record(kv: Any, parse: Callable[[bytes], T]) -> T | None:
    """`parse(kv.value)`, or None (and one warning naming the key) when it is not valid."""
    try:
        return parse(kv.value)
    except InvalidRecordError as exc:
        report_invalid(kv.key, getattr(kv, "mod_revision", 0), str(exc))
        return None

