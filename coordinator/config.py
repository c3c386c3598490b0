"""Coordinator settings: one frozen dataclass, read from flags or `HORDE_COORDINATOR_*`.

Rule (as for the rendezvous settings): an explicit flag or keyword wins over the
environment, which wins over the default. `CoordinatorConfig.from_env()` is the one
place that reads the environment; `horde-coordinator` passes its flags as overrides.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_DB_URL = "sqlite:///horde-coordinator.db"
DEFAULT_HALF_LIFE_DAYS = 7.0
DEFAULT_QUORUM = 2
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_SAMPLES_PER_ROUND = 1 << 20
DEFAULT_MAX_SPAN = 1024
ENV_PREFIX = "HORDE_COORDINATOR_"
_JOB = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class CoordinatorConfig:
    """What a coordinator serves and how it grants credit.

    db_url: any SQLAlchemy URL; SQLite (a file) is the embedded default.
    admin_token: bearer token for operator actions (evictions); None disables them.
    registration_token: when set, registering a node needs it as a bearer token.
    half_life_days: half-life of the recent-average credit (RAC).
    quorum: how many *other* members must attest a header (fewer when the world is
        smaller: all other members then).
    max_body_bytes: larger request bodies get 413.
    rendezvous_url / rendezvous_prefix / job: where to read membership (optional).
    watch_interval: seconds between rendezvous polls of the background watcher.
    rate_window: seconds over which samples/s and throughput are averaged.
    manifest_dir: folder with a volunteer job's signed manifest and files, served to
        `horde-volunteer join` (None: no volunteer job).
    sqlite_synchronous: SQLite's `synchronous` pragma (FULL: a commit survives power
        loss too; NORMAL: survives a crash of the process, not of the machine).
    trust_reported_membership: False (default): credit only rounds of generations read
        from the rendezvous. True: a quorum of reports may establish a generation the
        coordinator never saw; only for a closed cluster whose nodes are all trusted.
    max_samples_per_round: the most samples one member may claim per round (a report of
        a span of rounds: that many per round of the span); larger claims are rejected.
    max_span: the most rounds one report may cover (workers send HORDE_REPORT_SPAN, 16).
    etcd_admin_user / etcd_admin_password_file: an etcd identity holding etcd's `root`
        role (only that role may manage users); when set, registered nodes fetch their
        own per-node etcd credentials from POST /api/v1/nodes/<id>/etcd-credentials and an
        eviction revokes them (docs/security.md). Needs rendezvous_url.
    """

    db_url: str = DEFAULT_DB_URL
    admin_token: str | None = None
    registration_token: str | None = None
    half_life_days: float = DEFAULT_HALF_LIFE_DAYS
    quorum: int = DEFAULT_QUORUM
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    rendezvous_url: str | None = None
    rendezvous_prefix: str = "horde"
    job: str | None = None
    watch_rendezvous: bool = True
    watch_interval: float = 1.0
    rate_window: float = 60.0
    page_refresh_seconds: float = 2.0
    sqlite_synchronous: str = "FULL"
    trust_reported_membership: bool = False
    max_samples_per_round: int = DEFAULT_MAX_SAMPLES_PER_ROUND
    max_span: int = DEFAULT_MAX_SPAN
    manifest_dir: str | None = None
    etcd_admin_user: str | None = None
    etcd_admin_password_file: str | None = None

    def __post_init__(self) -> None:
        if not self.db_url or "://" not in self.db_url:
            raise ValueError(
                f"db_url={self.db_url!r} must be an SQLAlchemy URL such as "
                "sqlite:///ledger.db or postgresql+psycopg://user@host/db"
            )
        for name in ("admin_token", "registration_token"):
            token = getattr(self, name)
            if token is not None and len(token) < 16:
                raise ValueError(f"{name} must be at least 16 characters long (got {len(token)})")
        if not 0.0 < self.half_life_days <= 3650.0:
            raise ValueError(
                f"half_life_days={self.half_life_days} must lie in (0, 3650] days")
        if not 1 <= self.quorum <= 64:
            raise ValueError(f"quorum={self.quorum} must lie between 1 and 64")
        if not 1024 <= self.max_body_bytes <= 1024**3:
            raise ValueError(
                f"max_body_bytes={self.max_body_bytes} must lie between 1 KiB and 1 GiB")
        if self.job is not None and not _JOB.fullmatch(self.job):
            raise ValueError(
                f"job={self.job!r} must be 1-64 characters of letters, digits, '.', '_', '-'")
        if not self.rendezvous_prefix.strip("/"):
            raise ValueError(f"rendezvous_prefix={self.rendezvous_prefix!r} must not be empty")
        if self.watch_interval <= 0 or self.rate_window <= 0 or self.page_refresh_seconds <= 0:
            raise ValueError("watch_interval, rate_window and page_refresh_seconds must be > 0")
        if not 1 <= self.max_samples_per_round <= 10**9:
            raise ValueError(f"max_samples_per_round={self.max_samples_per_round} must lie "
                             "between 1 and 10^9")
        if not 1 <= self.max_span <= 10**6:
            raise ValueError(f"max_span={self.max_span} must lie between 1 and 10^6 rounds")
        if (self.etcd_admin_user is None) != (self.etcd_admin_password_file is None):
            raise ValueError("etcd_admin_user and etcd_admin_password_file go together: give "
                             "both (an etcd user with the root role and its password file) or "
                             "neither")
        if self.etcd_admin_user is not None and not self.rendezvous_url:
            raise ValueError("etcd_admin_user needs rendezvous_url: the coordinator issues "
                             "etcd credentials on the job's rendezvous")
        if self.sqlite_synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(
                f"sqlite_synchronous={self.sqlite_synchronous!r} must be one of "
                "OFF, NORMAL, FULL, EXTRA")

    @property
    def half_life_seconds(self) -> float:
        return self.half_life_days * 86400.0

    @property
    def prefix(self) -> str:
        """The rendezvous key prefix without slashes, as `JobKeys` wants it."""
        return self.rendezvous_prefix.strip("/")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> CoordinatorConfig:
        """Build a config from `HORDE_COORDINATOR_*` variables; non-None overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if f.type == "int":
                values[f.name] = int(raw)
            elif f.type == "float":
                values[f.name] = float(raw)
            elif f.type == "bool":
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
