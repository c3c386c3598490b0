"""The process's training session, shared by every frontend (`elastic.torch`, `elastic.tensorflow`).

One process is one node of one job, whichever frameworks it imports: this module holds
that process-wide state and its lifecycle (Horovod's init / shutdown / re-init, the
process-set registry, the credit reporter, the optimizers to finish at shutdown) and
hands out the current `GenerationRuntime`. Only frontends call it; the layers below a
frontend (engine, codecs, staleness, credit) are given the runtime they run in.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from elastic.core.runtime import GenerationRuntime
from elastic.core.worker import WorkerContext
from elastic.errors import NotInitializedError
from elastic.settings import WorkerSettings
from rendezvous.settings import RendezvousSettings

if TYPE_CHECKING:
    from elastic.credit.reporter import CreditReporter

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_context: WorkerContext | None = None
_reporter: CreditReporter | None = None


class ProcessSet:
    """A subset of ranks that runs collectives among itself (Horovod's `hvd.ProcessSet`)."""

    def __init__(self, ranks_or_comm: list[int] | tuple[int, ...] | None = None) -> None:
        self.ranks: list[int] | None = (
            sorted(int(r) for r in ranks_or_comm) if ranks_or_comm is not None else None
        )
        self.process_set_id: int | None = None

    def _invalid(self) -> bool:
        return self.process_set_id is None

    def size(self) -> int | None:
        """Number of ranks in the set (None before registration)."""
        if self.process_set_id == 0:
            return runtime().size
        return len(self.ranks) if self.ranks is not None and not self._invalid() else None

    def rank(self) -> int | None:
        """This process's rank within the set, or -1 when it is not a member."""
        if self._invalid():
            return None
        me = runtime().rank
        if self.process_set_id == 0 or self.ranks is None:
            return me
        return self.ranks.index(me) if me in self.ranks else -1

    def member_rank(self, what: str) -> int:
        """This process's rank in the set; ValueError naming `what` (the call) when the
        set is not registered or this process is not in it."""
        rank = self.rank()
        if rank is None:
            raise ValueError(f"{self} is not registered; call hvd.add_process_set() first")
        if rank < 0:
            raise ValueError(f"{what} was called on a rank that is not a member of {self}")
        return rank

    def included(self) -> bool | None:
        if self._invalid():
            return None
        return self.rank() != -1

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


global_process_set = ProcessSet()
global_process_set.process_set_id = 0
_process_sets: dict[int, ProcessSet] = {}
_next_set_id = 1


def context() -> WorkerContext:
    """This process's membership (node, generation, agent) while initialized;
    NotInitializedError (a ValueError) otherwise."""
    ctx = _context
    if ctx is None or ctx.runtime is None:
        raise NotInitializedError("Horovod")
    return ctx


def runtime() -> GenerationRuntime:
    """The runtime of the generation this process is connected to; NotInitializedError
    (a ValueError) before `init()` and after `shutdown()`."""
    ctx = _context
    current = ctx.runtime if ctx is not None else None
    if current is None:
        raise NotInitializedError("Horovod")
    return current


def settings() -> WorkerSettings:
    """The settings of this process: those of the first `init()`, else the environment's."""
    ctx = _context
    return ctx.settings if ctx is not None else WorkerSettings.from_env()


def is_initialized() -> bool:
    return _context is not None and _context.runtime is not None


def init(process_sets: list[ProcessSet] | str | None = None) -> None:
    """Join the job named by the `HORDE_*` environment (or form a world of one).

    After `shutdown()` this reconnects the same world: same node, same ranks (unless the
    membership changed meanwhile), a fresh engine and process groups.
    """
    global _context
    with _lock:
        if _context is not None and _context.runtime is not None:
            return
        if _context is not None:
            _context.reattach()
        else:
            worker = WorkerSettings.from_env()
            if worker.log_level:
                _configure_logging(worker.log_level)
            rdzv = RendezvousSettings.from_env()
            reports = _start_reporter(worker, rdzv)
            ctx = WorkerContext(worker, rdzv, reports=reports)
            try:
                ctx.start()
            except BaseException:
                _stop_reporter()
                raise
            _context = ctx
            atexit.register(_shutdown_at_exit)
        if sys.excepthook is not _note_crash:
            global _previous_excepthook
            _previous_excepthook = sys.excepthook
            sys.excepthook = _note_crash
        if process_sets and process_sets != "dynamic":
            for ps in process_sets:
                add_process_set(ps)


def _start_reporter(worker: WorkerSettings, rdzv: RendezvousSettings) -> CreditReporter | None:
    """Report rounds to the coordinator of the settings (HORDE_COORDINATOR), if any:
    only in a job with a rendezvous (a world of one earns no credit)."""
    global _reporter
    if not worker.coordinator or not worker.rendezvous:
        return None
    from elastic.credit.reporter import CreditReporter

    _reporter = CreditReporter(
        worker.coordinator, worker.node_id, rdzv.job,
        registration_token=worker.coordinator_registration_token,
        token=worker.coordinator_token, hardware=_hardware(), span=worker.report_span)
    return _reporter


def _hardware() -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(),
                            "cpus": os.cpu_count() or 0}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1))
    return info


def reporter() -> CreditReporter | None:
    """The coordinator reporter of this process, or None when there is no coordinator."""
    return _reporter


def record_loss(loss: float) -> None:
    """Horde addition: attach this training loss to the next round reports (status chart)."""
    if _reporter is not None:
        _reporter.loss = float(loss)


def _configure_logging(level: str) -> None:
    """Under horderun, show membership events of Horde's own loggers (not the root logger)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s horde %(levelname)s: %(message)s",
                                           "%H:%M:%S"))
    for name in ("rendezvous", "elastic"):
        log = logging.getLogger(name)
        if not log.handlers:
            log.addHandler(handler)
            log.setLevel(getattr(logging, level.upper(), logging.INFO))
            log.propagate = False


_finishers: list[weakref.WeakMethod] = []


def register_finisher(method: Callable[[], None]) -> None:
    """Run `method` (a bound method, held weakly) at shutdown, before the group goes;
    once, however often it is registered."""
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]
    if ref not in _finishers:
        _finishers.append(ref)


def _run_finishers(forget: bool) -> None:
    """Finish every live registered optimizer; `forget` drops them (the process ends).

    A plain `shutdown()` keeps them: an optimizer may be used again after `init()`.
    """
    for ref in list(_finishers):
        method = ref()
        if method is None:
            _finishers.remove(ref)
            continue
        try:
            method()
        except Exception:  # noqa: BLE001 - shutting down anyway
            logger.warning("finishing an optimizer at shutdown failed", exc_info=True)
    if forget:
        _finishers.clear()


def _stop_reporter() -> None:
    global _reporter
    if _reporter is not None:
        _reporter.close()
        _reporter = None


def shutdown() -> None:
    """Release the process groups and the engine (Horovod's `hvd.shutdown()`).

    The node stays registered with its rank, so `init()` gives the same world back; the
    job ends when its worker processes end (or `leave()`), never here. Registered
    process sets are cleared, as Horovod clears them.
    """
    global _next_set_id
    with _lock:
        ctx = _context
        if ctx is None or ctx.runtime is None:
            return
        _run_finishers(forget=False)
        if _reporter is not None:
            _reporter.flush()
        for ps in _process_sets.values():
            ps.process_set_id = None
        _process_sets.clear()
        _next_set_id = 1
        ctx.release()


def leave() -> None:
    """Leave an elastic job for good (after a commit) and exit the process with status 0."""
    global _context
    _stop_reporter()
    with _lock:
        ctx, _context = _context, None
        if ctx is not None:
            ctx.shutdown("left")
    logger.info("left the job")
    raise SystemExit(0)


def reset(failed: bool) -> None:
    """Leave the current generation and join the next one, in place (`hvd.elastic.run`);
    the registered process sets are rebuilt in it."""
    context().reset(failed)
    reattach_process_sets()


def check_host_updates() -> bool:
    """At a commit of elastic state: leave now if asked to (SIGTERM), else agree across
    ranks whether new members wait (one tiny MAX allreduce, named alike in every frontend)."""
    import torch

    from elastic.core.engine import Kind, ReduceOp, Request

    ctx = context()
    if ctx.leave_requested:
        leave()
    pending = torch.tensor([1 if ctx.host_updates_pending() else 0], dtype=torch.int32)
    (flag,) = runtime().engine.submit(Request(
        Kind.ALLREDUCE, [pending], name="horde.check_host_updates", op=ReduceOp.Max)).result()
    return bool(flag.item())


def reset_limit() -> int | None:
    """How many resets an elastic run may take (HORDE_RESET_LIMIT; None: no limit)."""
    return settings().reset_limit


_crashed = False


def _note_crash(exc_type: type, exc: BaseException, tb: object) -> None:
    global _crashed
    _crashed = True
    _previous_excepthook(exc_type, exc, tb)


_previous_excepthook = sys.excepthook


def _shutdown_at_exit() -> None:
    """At interpreter exit: leave as finished, or as failed after an uncaught exception.

    This, not `shutdown()`, tells the rendezvous that the node's work is over.
    """
    global _context
    try:
        if not _crashed and _context is not None and _context.runtime is not None:
            _run_finishers(forget=True)
        _stop_reporter()
        with _lock:
            ctx, _context = _context, None
            if ctx is not None:
                ctx.shutdown("failed" if _crashed else "finished")
    except Exception:  # noqa: BLE001 - exiting anyway
        logger.debug("shutdown at exit failed", exc_info=True)


def add_process_set(process_set: ProcessSet | list[int]) -> ProcessSet:
    """Register a process set on every rank (call it in the same order on all ranks)."""
    global _next_set_id
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    current = runtime()
    size = current.size
    if ps.ranks is None or not ps.ranks:
        raise ValueError("a process set needs a non-empty list of ranks")
    bad = [r for r in ps.ranks if not 0 <= r < size]
    if bad:
        raise ValueError(f"process set ranks {bad} are outside the world of size {size}")
    if len(set(ps.ranks)) != len(ps.ranks):
        raise ValueError(f"process set ranks {ps.ranks} contain duplicates")
    for existing in _process_sets.values():
        if existing.ranks == ps.ranks:
            raise ValueError(f"a process set with ranks {ps.ranks} is already registered")
    with _lock:
        set_id = _next_set_id
        _next_set_id += 1
    _attach(current, set_id, ps.ranks)
    ps.process_set_id = set_id
    _process_sets[set_id] = ps
    return ps


def _attach(current: GenerationRuntime, set_id: int, ranks: list[int]) -> None:
    current.engine.subsets[set_id] = current.transport.subset(ranks, set_id,
                                                                 current.interrupted)


def reattach_process_sets() -> None:
    """After a reset, rebuild the registered process sets that still fit the world."""
    current = runtime()
    size = current.size
    for set_id, ps in list(_process_sets.items()):
        if max(ps.ranks or [0]) < size:
            _attach(current, set_id, ps.ranks or [])
        else:
            logger.warning("process set %s no longer fits the world of %d; removed", ps, size)
            ps.process_set_id = None
            del _process_sets[set_id]


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a process set; returns False if it was not registered."""
    if process_set.process_set_id in (None, 0):
        return False
    set_id = process_set.process_set_id
    if set_id not in _process_sets:
        return False
    del _process_sets[set_id]
    runtime().engine.subsets.pop(set_id, None)
    process_set.process_set_id = None
    return True


def process_set_id(process_set: ProcessSet) -> int:
    """The registered id of `process_set`; ValueError when it is not registered."""
    if process_set.process_set_id is None:
        raise ValueError(
            f"{process_set} is not registered; call hvd.add_process_set() on every rank first")
    return process_set.process_set_id
