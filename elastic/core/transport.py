"""Per-generation collective transport on `torch.distributed` process groups.

A `Transport` is built for one generation from the store that the generation names,
under a store namespace of its own, so groups of different generations never mix.
Gloo carries CPU tensors; an NCCL group is created on first use of a CUDA tensor.
A transport is never reused after its generation ends: a stale one is closed and a
new one is built, which is how a membership change happens without restarting.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from elastic.core.stall import StallInspector
from elastic.errors import HorovodInternalError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def connect_store(host: str, port: int, timeout: float) -> dist.Store:
    """A client of the TCPStore that hosts the generation's rendezvous."""
    return dist.TCPStore(
        host, port, None, False, timeout=datetime.timedelta(seconds=timeout),
        wait_for_workers=False,
    )


def serve_store(host: str, timeout: float) -> dist.TCPStore:
    """Start this process's own TCPStore server on a free port (port 0 picks one)."""
    return dist.TCPStore(
        host, 0, None, True, timeout=datetime.timedelta(seconds=timeout),
        wait_for_workers=False,
    )


ARRIVAL_POLL = 0.05  # seconds between checks of the store for the peers' arrival
#: the most seconds Gloo's pairing may take once every peer has arrived; a peer that dies
#: in between then costs this long, not the whole collective timeout
GLOO_CONNECT_TIMEOUT = 20.0
#: the most seconds a relay may stay silent while a collective awaits it (it is pinged
#: every second); a dead relay then fails the collective instead of hanging it
RELAY_TIMEOUT = 10.0


def await_arrivals(store: dist.Store, prefix: str, rank: int, size: int,
                   interrupted: threading.Event | None, timeout: float) -> None:
    """Mark this rank as arrived under `prefix` and wait until all `size` ranks have.

    Gloo's own connect blocks in native code until every peer is there, and a thread
    left blocked there when the generation is superseded can outlive the interpreter
    (the process then aborts at exit). Waiting here first, in Python and interruptibly,
    means Gloo is only entered once every peer has arrived. Raises InterruptedError when
    `interrupted` is set and TimeoutError after `timeout` seconds.
    """
    store.set(f"{prefix}{rank}", b"1")
    keys = [f"{prefix}{r}" for r in range(size)]
    deadline = time.monotonic() + timeout
    while not store.check(keys):
        if interrupted is not None and interrupted.is_set():
            raise InterruptedError("generation superseded while its peers were arriving")
        if time.monotonic() > deadline:
            missing = [r for r in range(size) if not store.check([keys[r]])]
            raise TimeoutError(f"ranks {missing} did not arrive within {timeout:g} s")
        time.sleep(ARRIVAL_POLL)


class Transport:
    """The process groups of one generation: gloo always (and a second gloo group that
    carries only DistributedOptimizer buckets in steady state, `gradients`), NCCL lazily
    for CUDA tensors."""

    def __init__(
        self,
        store: dist.Store,
        namespace: str,
        rank: int,
        size: int,
        timeout: float,
        bind_host: str | None = None,
        arrived: bool = False,
        relay: str = "",
        reachable: bool = False,
    ) -> None:
        self.namespace = namespace
        self.relay = relay
        """HOST:PORT of the relay hub of this generation ("": direct Gloo)."""
        self.reachable = reachable
        """Whether this member accepts inbound connections (relay generations only)."""
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self._store = store
        self._bind_host = bind_host
        self._nccl: dist.ProcessGroup | None = None
        self._lock = threading.Lock()
        self.members: tuple[int, ...] | None = None
        """Global ranks of a process set's transport (None: the whole world)."""
        self._children: list[Transport] = []
        self.gloo = self._make_gloo(namespace, rank, size, arrived)
        self.gradients: dist.ProcessGroupGloo | None = (
            self._make_gloo(namespace + "grad/", rank, size, arrived) if size > 1 else None)

    def _make_gloo(self, namespace: str, rank: int, size: int, arrived: bool = False
                   ) -> dist.ProcessGroup:
        """A Gloo group; `arrived` (every peer is known to be there) bounds the pairing
        by GLOO_CONNECT_TIMEOUT, and collectives then get the full timeout. In a relay
        generation, a `RelayProcessGroup` instead (members only dial out to the hub)."""
        if self.relay and size > 1:
            from elastic.core.relay import RelayProcessGroup

            return RelayProcessGroup(
                self.relay, namespace, rank, size, self.timeout,
                relay_timeout=min(self.timeout, RELAY_TIMEOUT),
                store=dist.PrefixStore(namespace + "relay/", self._store),
                reachable=self.reachable, bind_host=self._bind_host)
        connect = min(self.timeout, GLOO_CONNECT_TIMEOUT) if arrived else self.timeout
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=connect)
        if self._bind_host:
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self._bind_host)]
        else:
            opts._devices = [dist.ProcessGroupGloo.create_default_device()]
        store = dist.PrefixStore(namespace + "gloo/", self._store)
        group = dist.ProcessGroupGloo(store, rank, size, opts)
        if connect != self.timeout:
            group._set_default_timeout(datetime.timedelta(seconds=self.timeout))
        return group

    def group_for(self, tensor: torch.Tensor) -> dist.ProcessGroup:
        """The group that moves `tensor`: NCCL for CUDA tensors, gloo otherwise (the
        relay group for both in a relay generation: CUDA tensors go through host memory)."""
        if tensor.is_cuda and not self.relay:
            return self._nccl_group()
        return self.gloo

    def _nccl_group(self) -> dist.ProcessGroup:
        with self._lock:
            if self._nccl is None:
                if not dist.is_nccl_available():
                    raise RuntimeError(
                        "a CUDA tensor was given but this PyTorch build has no NCCL; "
                        "move the tensor to the CPU or install a CUDA build of PyTorch"
                    )
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = datetime.timedelta(seconds=self.timeout)
                store = dist.PrefixStore(self.namespace + "nccl/", self._store)
                self._nccl = dist.ProcessGroupNCCL(store, self.rank, self.size, opts)
            return self._nccl

    def subset(self, ranks: Sequence[int], set_id: int,
               interrupted: threading.Event | None = None) -> Transport | None:
        """A transport over `ranks` (a process set); None on ranks outside it.

        Connecting waits for every rank of the set; with `interrupted`, a membership
        change ends that wait with HorovodInternalError (a member that died before it
        connected would otherwise hold the others for the whole timeout).
        """
        if self.rank not in ranks:
            return None
        sub = object.__new__(Transport)
        sub.namespace = f"{self.namespace}ps{set_id}/"
        sub.relay = self.relay
        sub.reachable = self.reachable
        sub.rank = list(ranks).index(self.rank)
        sub.size = len(ranks)
        sub.timeout = self.timeout
        sub._store = self._store
        sub._bind_host = self._bind_host
        sub._nccl = None
        sub._lock = threading.Lock()
        sub.members = tuple(ranks)
        sub._children = []
        self._children.append(sub)
        def connect() -> dist.ProcessGroupGloo:
            await_arrivals(self._store, sub.namespace + "arrived/", sub.rank, sub.size,
                           interrupted, self.timeout)
            return sub._make_gloo(sub.namespace, sub.rank, sub.size, arrived=True)

        if interrupted is None:
            sub.gloo = connect()
        else:
            try:
                sub.gloo = build_interruptibly(connect, interrupted)
            except InterruptedError:
                raise HorovodInternalError(
                    f"connecting process set {set_id} was interrupted: the membership "
                    "changed (a peer died, hung or left)") from None
        sub.gradients = None
        return sub

    def close(self) -> None:
        """Abort the groups (and those of its process sets) so that no thread stays
        blocked on a dead peer; a relay group also ends its connection and thread."""
        for child in self._children:
            child.close()
        self._children.clear()
        for group in (getattr(self, "gloo", None), getattr(self, "gradients", None),
                      self._nccl):
            if group is None:
                continue
            try:
                group.abort()
            except Exception:  # noqa: BLE001 - best effort on a group being dropped
                logger.debug("abort of %s failed", group, exc_info=True)


WAIT_SLICE = datetime.timedelta(seconds=0.05)


def wait_interruptibly(
    work: Any, interrupted: threading.Event, what: str, stall: StallInspector | None = None,
    describe: str | Callable[[], str] | None = None, check: bool = True,
    members: Sequence[int] | None = None,
) -> None:
    """Wait for a Gloo work in slices, so that a membership change (`interrupted`)
    ends the wait; errors become HorovodInternalError naming `what`.

    `Work.wait(timeout)` wakes the caller from C++; a done-callback would need the GIL on
    Gloo's thread (0.2 ms more per collective). A wait that outlasts its first slice is
    entered in `stall` as `describe` (the stall check skips it unless `check`), among the
    global ranks `members` (None: all); a stall shutdown ends it with CollectiveStallError.
    """
    started = time.monotonic() if stall is not None else 0.0
    token = None
    try:
        while True:
            try:
                work.wait(WAIT_SLICE)
                return
            except RuntimeError:
                if work.is_completed():  # it failed, or finished just after the slice
                    break
                if interrupted.is_set():
                    raise HorovodInternalError(
                        f"{what} was interrupted: the membership changed (a peer died, hung "
                        "or left)") from None
                if stall is not None:
                    if token is None:
                        token = stall.enter(describe or what, started, check, members)
                    stall.raise_if_failed()
    finally:
        if token is not None:
            stall.leave(token)  # type: ignore[union-attr]
    try:
        work.wait()
    except RuntimeError as exc:
        lag = time.monotonic() - started
        if token is not None and 0 < stall.check_time <= lag:  # type: ignore[union-attr]
            raise HorovodInternalError(
                f"{what} failed after stalling for {lag:.0f} s (the stall warnings above name "
                f"the ranks that did not submit it): {exc}") from exc
        raise HorovodInternalError(f"{what} failed: {exc}") from exc


def build_interruptibly(
    build: Callable[[], T], interrupted: threading.Event, poll: float = 0.05
) -> T:
    """Run a blocking group construction in a thread; give up when `interrupted` is set.

    Connecting a group blocks until every member arrives; if the generation is
    superseded meanwhile (a member died before connecting) we must not wait for the
    full timeout. The abandoned thread ends on its own when the store times out.
    """
    result: dict[str, object] = {}
    done = threading.Event()

    def target() -> None:
        try:
            result["built"] = build()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=target, name="horde-connect", daemon=True)
    thread.start()
    while not done.wait(poll):
        if interrupted.is_set():
            _abandoned.append(thread)
            raise InterruptedError("generation superseded while connecting its process group")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["built"]  # type: ignore[return-value]


_abandoned: list[threading.Thread] = []


@atexit.register
def _await_abandoned_connects() -> None:
    """Let connects given up on end before the interpreter does.

    A thread still inside Gloo's connect when the interpreter finalizes aborts the process
    when the call returns (SIGABRT at exit, after a member died while a group paired).
    Such a connect ends within GLOO_CONNECT_TIMEOUT once every peer had arrived.
    """
    alive = [t for t in _abandoned if t.is_alive()]
    if not alive:
        return
    logger.info("waiting up to %g s for %d abandoned process-group connect(s) to end",
                GLOO_CONNECT_TIMEOUT, len(alive))
    deadline = time.monotonic() + GLOO_CONNECT_TIMEOUT + 5.0
    for thread in alive:
        thread.join(max(0.0, deadline - time.monotonic()))
