"""Membership settings: one frozen dataclass, read from flags or `HORDE_*` variables.

Rule: an explicit flag (or keyword) wins over the environment, which wins over the
default; in the environment a `HORDE_*` variable wins over its Horovod twin
(`HOROVOD_ELASTIC_TIMEOUT`, `HOROVOD_START_TIMEOUT`). `horderun` passes its resolved
settings to workers through the environment, so a worker and its launcher always agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_PREFIX = "horde"
RELAY_MODES = ("auto", "always", "never")

#: Horovod's variables for the same settings, read when the `HORDE_*` one is not set.
HOROVOD_TWINS = {"elastic_timeout": "HOROVOD_ELASTIC_TIMEOUT",
                 "start_timeout": "HOROVOD_START_TIMEOUT"}


def _parse_cooldown(text: str) -> tuple[float, float] | None:
    text = text.strip()
    if not text:
        return None
    parts = text.replace(",", " ").split()
    if len(parts) != 2:
        raise ValueError(
            f"blacklist cooldown range {text!r} must be two numbers 'MIN MAX' (seconds)"
        )
    return float(parts[0]), float(parts[1])


@dataclass(frozen=True)
class RendezvousSettings:
    """How a job forms and keeps its membership (all durations in seconds)."""

    job: str = "default"
    prefix: str = DEFAULT_PREFIX
    min_np: int = 1
    max_np: int = 1
    target_np: int = 1
    lease_ttl: int = 5
    settle_window: float = 0.5
    #: the longest a join waits for later joins to batch with it (under a steady stream
    #: of joins the settle window is never quiet): lower admits sooner, at the cost of
    #: more generations (each one a reset of every worker)
    admission_window: float = 2.0
    start_timeout: float = 30.0
    elastic_timeout: float = 600.0
    reset_timeout: float = 15.0
    blacklist_cooldown: tuple[float, float] | None = None
    poll_interval: float = 0.5
    #: HOST:PORT of the job's relay hub ("": none; `horderun --listen` starts one)
    relay: str = ""
    #: port of the store the relay host serves for generations that use the relay
    relay_store_port: int = 0
    #: when generations go through the relay: "auto" (when a member is not reachable),
    #: "always" (tests, benchmarks), "never"
    relay_mode: str = "auto"

    def __post_init__(self) -> None:
        if not self.job or "/" in self.job:
            raise ValueError(f"job name {self.job!r} must be non-empty and contain no '/'")
        if self.min_np < 1:
            raise ValueError(f"min_np={self.min_np} must be at least 1")
        if self.max_np < self.min_np:
            raise ValueError(f"max_np={self.max_np} must be >= min_np={self.min_np}")
        if not self.min_np <= self.target_np <= self.max_np:
            raise ValueError(
                f"np={self.target_np} must lie between min_np={self.min_np} "
                f"and max_np={self.max_np}"
            )
        if self.lease_ttl < 2:
            raise ValueError(f"lease_ttl={self.lease_ttl} must be at least 2 s (etcd's minimum)")
        for name in ("settle_window", "admission_window", "start_timeout", "elastic_timeout",
                     "reset_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative")
        if self.relay_mode not in RELAY_MODES:
            raise ValueError(f"relay_mode={self.relay_mode!r} must be one of "
                             f"{', '.join(RELAY_MODES)}")
        if self.relay:
            host, sep, port = self.relay.rpartition(":")
            if not (sep and host and port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError(f"relay={self.relay!r} must be HOST:PORT")
            if not 1 <= self.relay_store_port <= 65535:
                raise ValueError(f"relay_store_port={self.relay_store_port} must be 1-65535 "
                                 "when a relay is set")
        if self.blacklist_cooldown is not None:
            low, high = self.blacklist_cooldown
            if not 0 <= low <= high:
                raise ValueError(
                    f"blacklist cooldown range ({low}, {high}) must satisfy 0 <= MIN <= MAX"
                )

    @property
    def elastic(self) -> bool:
        return self.min_np != self.max_np

    def request_timeout(self, url: str) -> float:
        """Seconds one etcd request may take before the agent tries another member.

        With one member: 5 s, as before. With several (`etcd://h1:p1,h2:p2,...`): half a
        lease TTL (1 to 5 s), so that a keepalive due every TTL/3 that meets a hung member
        still reaches another one before the lease runs out.
        """
        if "," not in url:
            return 5.0
        return min(5.0, max(1.0, self.lease_ttl / 2.0))

    def to_env(self) -> dict[str, str]:
        """The `HORDE_*` variables that make `from_env()` return these settings."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "blacklist_cooldown":
                value = "" if value is None else f"{value[0]} {value[1]}"
            env[f"HORDE_{f.name.upper()}"] = str(value)
        return env

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> RendezvousSettings:
        """Build settings from `HORDE_*` variables; keyword overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"HORDE_{f.name.upper()}")
            if raw is None and f.name in HOROVOD_TWINS:
                raw = environ.get(HOROVOD_TWINS[f.name]) or None
            if raw is None:
                continue
            if f.name == "blacklist_cooldown":
                values[f.name] = _parse_cooldown(raw)
            elif f.type in ("int",):
                values[f.name] = int(raw)
            elif f.type in ("float",):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
