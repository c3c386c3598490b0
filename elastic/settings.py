"""Training-side settings of a worker, read from `HORDE_*` variables in one place.

`horderun` resolves its flags into these variables for every worker it starts; a
script started by hand reads the same variables (flags of the launcher win, since the
launcher writes the environment it passes down).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_REPORT_SPAN = 16


@dataclass(frozen=True)
class WorkerSettings:
    """Where the rendezvous is, who this worker is, and how long collectives may take."""

    rendezvous: str = ""
    node_id: str = ""
    hostname: str = ""
    advertise_addr: str = "127.0.0.1"
    collective_timeout: float = 60.0
    reset_limit: int | None = None
    order: int = 0
    log_level: str = ""
    batch: str = ""
    """The launch batch (one `horderun` start of several workers), admitted together."""
    batch_size: int = 1
    report_span: int = DEFAULT_REPORT_SPAN
    """Synchronous steps per credit report (HORDE_REPORT_SPAN; 1: a report per step)."""

    def __post_init__(self) -> None:
        if self.collective_timeout <= 0:
            raise ValueError(
                f"collective timeout {self.collective_timeout} must be a positive number of "
                "seconds")
        if self.reset_limit is not None and self.reset_limit < 0:
            raise ValueError(f"reset limit {self.reset_limit} must not be negative")
        if self.report_span < 1:
            raise ValueError(f"HORDE_REPORT_SPAN={self.report_span} must be a positive number "
                             "of steps (1: report every step)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if environ is None else environ
        hostname = env.get("HORDE_HOSTNAME") or env.get("HOROVOD_HOSTNAME") or socket.gethostname()
        limit = env.get("HORDE_RESET_LIMIT", "")
        return cls(
            rendezvous=env.get("HORDE_RENDEZVOUS", ""),
            node_id=env.get("HORDE_NODE_ID") or f"{hostname}-{os.getpid()}",
            hostname=hostname,
            advertise_addr=env.get("HORDE_ADVERTISE_ADDR", "127.0.0.1"),
            collective_timeout=float(env.get("HORDE_COLLECTIVE_TIMEOUT", "60")),
            reset_limit=int(limit) if limit not in ("", "None") else None,
            order=int(env.get("HORDE_ORDER", "0")),
            log_level=env.get("HORDE_LOG_LEVEL", ""),
            batch=env.get("HORDE_BATCH", ""),
            batch_size=int(env.get("HORDE_BATCH_SIZE", "1")),
            report_span=_integer(env, "HORDE_REPORT_SPAN", DEFAULT_REPORT_SPAN),
        )


def _integer(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} must be an integer") from None
