"""Training-side settings of a worker, read from `HORDE_*` variables in one place.

`horderun` resolves its flags into these variables for every worker it starts; a
script started by hand reads the same variables (flags of the launcher win, since the
launcher writes the environment it passes down). Horovod's variables that have a Horde
meaning are read here too: a `HORDE_*` variable wins over its `HOROVOD_*` twin, which wins
over the default. Horovod's variables without one are named in one warning at init
(`ignored_horovod_variables`); docs/migrating-from-horovod.md has the table.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_REPORT_SPAN = 16
DEFAULT_MAX_NONFINITE_STEPS = 100
DEFAULT_MAX_OBJECT_BYTES = 1 << 30
DEFAULT_STALL_CHECK_TIME = 60.0
"""Horovod's default; lowered to half the collective timeout, so the warning comes first."""

#: Horovod variables with no effect in Horde (named in one warning at init when set).
IGNORED_HOROVOD_VARIABLES = (
    "HOROVOD_CYCLE_TIME", "HOROVOD_CACHE_CAPACITY", "HOROVOD_HIERARCHICAL_ALLREDUCE",
    "HOROVOD_HIERARCHICAL_ALLGATHER", "HOROVOD_AUTOTUNE", "HOROVOD_AUTOTUNE_LOG",
    "HOROVOD_AUTOTUNE_WARMUP_SAMPLES", "HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE",
    "HOROVOD_AUTOTUNE_BAYES_OPT_MAX_SAMPLES", "HOROVOD_AUTOTUNE_GAUSSIAN_PROCESS_NOISE",
    "HOROVOD_TIMELINE", "HOROVOD_TIMELINE_MARK_CYCLES", "HOROVOD_MPI_THREADS_DISABLE",
    "HOROVOD_NUM_NCCL_STREAMS", "HOROVOD_CCL_BGT_AFFINITY", "HOROVOD_CCL_CACHE",
    "HOROVOD_LOG_HIDE_TIME", "HOROVOD_BATCH_D2D_MEMCOPIES", "HOROVOD_THREAD_AFFINITY",
    "HOROVOD_DISABLE_GROUP_FUSION", "HOROVOD_DISABLE_NVTX_RANGES",
    "HOROVOD_ENABLE_ASYNC_COMPLETION", "HOROVOD_ADASUM_MPI_CHUNK_SIZE",
    "HOROVOD_ENABLE_XLA_OPS", "HOROVOD_GLOO_RENDEZVOUS_ADDR", "HOROVOD_GLOO_RENDEZVOUS_PORT",
)


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
    stall_check_time: float | None = None
    """Seconds in one collective before a stall warning (HOROVOD_STALL_CHECK_TIME_SECONDS;
    None: 60, or half the collective timeout if that is less)."""
    stall_shutdown_time: float = 0.0
    """Seconds before a stalled collective fails (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS;
    0: never; below the check time: never, as in Horovod)."""
    stall_check: bool = True
    """False when HOROVOD_STALL_CHECK_DISABLE=1: no warning, no shutdown."""
    fusion_threshold: int | None = None
    """Bytes per DistributedOptimizer bucket (HOROVOD_FUSION_THRESHOLD; None: the
    optimizer's default; 0: one bucket per tensor, i.e. no fusion)."""
    coordinator: str = ""
    """URL of the coordinator that rounds are reported to for credit (HORDE_COORDINATOR;
    empty: no reports)."""
    coordinator_registration_token: str | None = field(default=None, repr=False)
    """Bearer token for registering this node (HORDE_COORDINATOR_REGISTRATION_TOKEN)."""
    coordinator_token: str | None = field(default=None, repr=False)
    """This node's own token, if it registered before (HORDE_COORDINATOR_TOKEN)."""
    trusted_peers: bool = False
    """True (HORDE_TRUSTED_PEERS=1, `horderun --trusted-peers`): objects from peers are
    fully unpickled. Off by default: peers' objects are read as data only
    (elastic/serialization.py), since volunteers are untrusted."""
    max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS
    """Consecutive steps (synchronous) or rounds (staleness) whose aggregated gradient is
    non-finite, each skipped on every member, before the job stops with
    `NonFiniteGradientError` (HORDE_MAX_NONFINITE_STEPS; 0: never skip nor stop, as
    Horovod)."""
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    """The largest serialized object a peer may announce to broadcast_object,
    allgather_object or the elastic state sync (HORDE_MAX_OBJECT_BYTES, default 1 GiB): a
    larger announced size is refused before anything is allocated, so a hostile member
    cannot make its peers allocate 2^40 bytes."""
    max_allgather_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    """The largest part one rank may announce in a tensor allgather or alltoall (its
    first dimension times the bytes of a row; HORDE_MAX_ALLGATHER_BYTES, default
    HORDE_MAX_OBJECT_BYTES's value, so raising that for `allgather_object` raises both): a
    larger (or negative) announced size is refused on every rank before the result is
    allocated, so a hostile member cannot make its peers allocate 2^40 rows."""
    robust_aggregation: int = 0
    """F > 0 (HORDE_ROBUST_AGGREGATION, `horderun --robust-aggregation F`): where each
    member's gradient is seen (synchronous top-k, staleness rounds), the F furthest from
    the others are left out of every aggregate (multi-Krum, `elastic.codecs.robust`);
    0: plain average. Every member of a job must use the same value."""

    @property
    def stall_check_seconds(self) -> float:
        """The stall-check time in force; 0 when the check is off."""
        if not self.stall_check:
            return 0.0
        if self.stall_check_time is not None:
            return self.stall_check_time
        return min(DEFAULT_STALL_CHECK_TIME, self.collective_timeout / 2)

    @property
    def stall_shutdown_seconds(self) -> float:
        """The stall-shutdown time in force; 0 (never) when below the check time."""
        check = self.stall_check_seconds
        if check <= 0 or self.stall_shutdown_time < check:
            return 0.0
        return self.stall_shutdown_time

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
        if self.stall_check_time is not None and self.stall_check_time < 0:
            raise ValueError(f"HOROVOD_STALL_CHECK_TIME_SECONDS={self.stall_check_time:g} must "
                             "be >= 0 seconds")
        if self.stall_shutdown_time < 0:
            raise ValueError(f"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS={self.stall_shutdown_time:g} "
                             "must be >= 0 seconds (0: never)")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"HORDE_MAX_NONFINITE_STEPS={self.max_nonfinite_steps} must be >= 0 "
                             "(0: never skip a non-finite step)")
        if self.max_object_bytes <= 0:
            raise ValueError(f"HORDE_MAX_OBJECT_BYTES={self.max_object_bytes} must be > 0 "
                             f"(bytes; default {DEFAULT_MAX_OBJECT_BYTES})")
        if self.max_allgather_bytes <= 0:
            raise ValueError(f"HORDE_MAX_ALLGATHER_BYTES={self.max_allgather_bytes} must be > 0 "
                             "(bytes; default HORDE_MAX_OBJECT_BYTES's value)")
        if self.robust_aggregation < 0:
            raise ValueError(f"HORDE_ROBUST_AGGREGATION={self.robust_aggregation} must be >= 0 "
                             "(the number of hostile members to outvote; 0: off)")
        if self.fusion_threshold is not None and self.fusion_threshold < 0:
            raise ValueError(f"HOROVOD_FUSION_THRESHOLD={self.fusion_threshold} must be >= 0 "
                             "bytes (0: no fusion)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if environ is None else environ
        hostname = env.get("HORDE_HOSTNAME") or env.get("HOROVOD_HOSTNAME") or socket.gethostname()
        limit = env.get("HORDE_RESET_LIMIT", "")
        max_object_bytes = _integer(env, "HORDE_MAX_OBJECT_BYTES", DEFAULT_MAX_OBJECT_BYTES)
        return cls(
            rendezvous=env.get("HORDE_RENDEZVOUS", ""),
            node_id=env.get("HORDE_NODE_ID") or f"{hostname}-{os.getpid()}",
            hostname=hostname,
            advertise_addr=env.get("HORDE_ADVERTISE_ADDR", "127.0.0.1"),
            collective_timeout=_number(env, ("HORDE_COLLECTIVE_TIMEOUT",
                                             "HOROVOD_GLOO_TIMEOUT_SECONDS"), 60.0),
            reset_limit=int(limit) if limit not in ("", "None") else None,
            order=int(env.get("HORDE_ORDER", "0")),
            log_level=_level(env.get("HORDE_LOG_LEVEL") or env.get("HOROVOD_LOG_LEVEL", "")),
            batch=env.get("HORDE_BATCH", ""),
            batch_size=int(env.get("HORDE_BATCH_SIZE", "1")),
            report_span=_integer(env, "HORDE_REPORT_SPAN", DEFAULT_REPORT_SPAN),
            stall_check_time=_number(env, ("HOROVOD_STALL_CHECK_TIME_SECONDS",), None),
            stall_shutdown_time=_number(env, ("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",), 0.0),
            stall_check=not _flag(env, "HOROVOD_STALL_CHECK_DISABLE"),
            fusion_threshold=_integer(env, "HOROVOD_FUSION_THRESHOLD", None),
            coordinator=env.get("HORDE_COORDINATOR", ""),
            coordinator_registration_token=env.get("HORDE_COORDINATOR_REGISTRATION_TOKEN")
            or None,
            coordinator_token=env.get("HORDE_COORDINATOR_TOKEN") or None,
            trusted_peers=_flag(env, "HORDE_TRUSTED_PEERS"),
            max_nonfinite_steps=_integer(env, "HORDE_MAX_NONFINITE_STEPS",
                                         DEFAULT_MAX_NONFINITE_STEPS),
            robust_aggregation=_integer(env, "HORDE_ROBUST_AGGREGATION", 0),
            max_object_bytes=max_object_bytes,
            max_allgather_bytes=_integer(env, "HORDE_MAX_ALLGATHER_BYTES", max_object_bytes),
        )


def horovod_notes(settings: WorkerSettings, environ: Mapping[str, str] | None = None
                  ) -> list[str]:
    """What a user who set Horovod variables should know: which are ignored, and a stall
    shutdown that cannot happen. Logged once per process at init."""
    env = os.environ if environ is None else environ
    notes = []
    ignored = [name for name in IGNORED_HOROVOD_VARIABLES if env.get(name)]
    ignored += [name for name in ("HOROVOD_CONTROLLER", "HOROVOD_CPU_OPERATIONS")
                if env.get(name, "gloo").lower() != "gloo"]
    if ignored:
        notes.append("these Horovod environment variables have no effect in Horde and are "
                     f"ignored: {', '.join(ignored)} (see docs/migrating-from-horovod.md)")
    if (settings.stall_check_seconds > 0 and settings.stall_shutdown_time > 0
            and settings.stall_shutdown_seconds == 0):
        notes.append(f"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS={settings.stall_shutdown_time:g} is "
                     "less than the stall-check time "
                     f"({settings.stall_check_seconds:g} s): stalled collectives will not be "
                     "shut down")
    if settings.stall_check_seconds >= settings.collective_timeout:
        notes.append(f"the stall-check time ({settings.stall_check_seconds:g} s) is not below "
                     f"the collective timeout ({settings.collective_timeout:g} s): a stalled "
                     "collective times out before any stall warning")
    return notes


def _integer(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    text = env.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} must be an integer") from None


def _number(env: Mapping[str, str], names: tuple[str, ...], default: float | None
            ) -> float | None:
    """The first of `names` that is set (HORDE_* before HOROVOD_*), as seconds."""
    for name in names:
        text = env.get(name, "")
        if text:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} must be a number of seconds") from None
    return default


def _level(text: str) -> str:
    """Horovod's log levels as `logging` names them (TRACE is DEBUG)."""
    text = text.strip().upper()
    return "DEBUG" if text == "TRACE" else text


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")
