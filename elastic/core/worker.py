"""The worker's side of membership: joins generations and owns their transport.

A `WorkerContext` lives from the first `hvd.init()` to the end of the process (or
`leave()`). It registers the process with the rendezvous (through a `NodeAgent`),
waits to be admitted to a generation, connects that generation's process group, and
rebuilds it in place when the membership changes. `hvd.shutdown()` releases the
process group but keeps the registration, so the next `hvd.init()` reconnects the
same world (`release()` / `reattach()`). Without a rendezvous (a plain
`python train.py`) it forms a world of one, as Horovod does.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

import torch.distributed as dist

from elastic.core.engine import CollectiveEngine
from elastic.core.runtime import GenerationRuntime, Topology
from elastic.core.stall import StallInspector, read_activity
from elastic.core.transport import (
    Transport,
    await_arrivals,
    build_interruptibly,
    connect_store,
    serve_store,
)
from elastic.errors import GenerationUnreachableError, HorovodInternalError
from elastic.settings import WorkerSettings, horovod_notes
from rendezvous.agent import ControlState, NodeAgent
from rendezvous.errors import RendezvousClosedError, RendezvousTimeoutError
from rendezvous.generation import Generation, Member, NodeInfo
from rendezvous.settings import RendezvousSettings

if TYPE_CHECKING:
    from elastic.credit.reporter import CreditReporter

logger = logging.getLogger(__name__)

_noted = False
#: seconds the relay's reachability probe may take at registration
RELAY_PROBE_TIMEOUT = 10.0
"""Whether this process logged its notes on Horovod variables (once, not per init)."""


class WorkerContext:
    """Membership and transport of this process, generation after generation."""

    def __init__(self, settings: WorkerSettings, rendezvous: RendezvousSettings,
                 reports: CreditReporter | None = None) -> None:
        self.settings = settings
        self.reports = reports
        self.rdzv = rendezvous
        self.node_id = settings.node_id
        self.agent: NodeAgent | None = None
        #: the latest generation this node is a member of (kept while shut down, set
        #: before its process group is connected)
        self.generation: Generation | None = None
        #: the connected generation's runtime; None between generations and after
        #: `release()`
        self.runtime: GenerationRuntime | None = None
        self._interrupted = threading.Event()
        self._growth_pending = False
        self._lock = threading.Lock()
        self._store_server: dist.TCPStore | None = None
        self._graveyard: list[object] = []
        #: generation id -> process groups this process began to connect in it: each
        #: re-init after `release()` connects under a store namespace of its own
        self._connects: dict[int, int] = {}
        #: between `release()` and `reattach()`: in no collective, so a reset of this
        #: generation needs nothing from this node but its ready marker
        self._parked = False
        self._answered = -1  # the last generation whose reset this node answered
        self.resets = 0
        self.leave_requested = False

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Register and join the first generation (or form a world of one)."""
        global _noted
        if not _noted:
            _noted = True
            for note in horovod_notes(self.settings):
                logger.warning("%s", note)
        if not self.settings.rendezvous:
            self._start_alone()
            return
        from rendezvous import backend_from_url

        self._store_server = serve_store(self.settings.advertise_addr, self.rdzv.start_timeout)
        backend = backend_from_url(self.settings.rendezvous,
                                   timeout=self.rdzv.request_timeout(self.settings.rendezvous))
        info = NodeInfo(node_id=self.node_id, host=self.settings.hostname,
                        addr=self.settings.advertise_addr,
                        store_port=self._store_server.port, pid=os.getpid(),
                        order=self.settings.order, batch=self.settings.batch,
                        batch_size=self.settings.batch_size,
                        reachable=self._reachable(self._store_server.port))
        self.agent = NodeAgent(backend, self.rdzv, info)
        self.agent.add_listener(self._on_control)
        self.agent.start()
        if self.rdzv.elastic and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._request_leave)
        self._establish(after=-1, timeout=self.rdzv.start_timeout + self.rdzv.elastic_timeout
                        if self.rdzv.elastic else self.rdzv.start_timeout + 5.0)

    def _reachable(self, port: int) -> bool:
        """Whether the job's relay can dial this node back at its advertised address (the
        store port it serves); True where the job has no relay, or the probe fails (then
        this node is treated as before relays existed, and told so)."""
        if not self.rdzv.relay or self.rdzv.relay_mode == "never":
            return True
        from elastic.core.relay import probe_reachable

        try:
            reachable = probe_reachable(self.rdzv.relay, self.settings.advertise_addr, port,
                                        timeout=RELAY_PROBE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - logged; the node joins as reachable
            logger.warning("node %s: the relay at %s did not answer the reachability probe "
                           "(%s); assuming %s accepts inbound connections", self.node_id,
                           self.rdzv.relay, exc, self.settings.advertise_addr)
            return True
        logger.info("node %s: %s inbound connections at %s", self.node_id,
                    "accepts" if reachable else "does not accept (behind NAT or a firewall): "
                    "its generations go through the relay; it accepts no",
                    self.settings.advertise_addr)
        return reachable

    def _start_alone(self) -> None:
        store = dist.HashStore()
        gen = Generation(id=0, members=(Member(self.node_id, self.settings.hostname,
                                               "127.0.0.1"),), store_host="", store_port=0,
                         reason="single process")
        transport = Transport(store, "alone/", 0, 1, self.settings.collective_timeout)
        self._install(gen, transport, threading.Event())

    def _request_leave(self, _signum: int, _frame: object) -> None:
        """SIGTERM in an elastic job: leave cleanly at the next commit."""
        logger.info("node %s: asked to leave; leaving at the next commit", self.node_id)
        self.leave_requested = True

    def release(self, park: bool = True) -> None:
        """`hvd.shutdown()`: stop the engine and drop this generation's process groups,
        but stay registered (same lease, same rank) so that `reattach()` can reconnect.

        Dropping the groups closes their connections, so a peer still inside a
        collective fails at once (HorovodInternalError) instead of at its timeout.
        """
        with self._lock:
            runtime, self.runtime = self.runtime, None
            self._parked = park
        if runtime is not None:
            runtime.engine.close()
            runtime.engine.subsets.clear()
            if runtime.transport.relay:  # its groups hold a thread and a socket each
                runtime.transport.close()
        if park and self.agent is not None:
            self._on_control(self.agent.control)  # a reset may already be pending

    def reattach(self) -> None:
        """`hvd.init()` after `release()`: connect a fresh process group in the latest
        generation that includes this node: the same one, unless the membership changed
        meanwhile."""
        self._parked = False
        if self.agent is None:
            self._start_alone()
            return
        after = self.generation.id - 1 if self.generation is not None else -1
        self._establish(after=after, timeout=self.rdzv.start_timeout + self.rdzv.elastic_timeout
                        if self.rdzv.elastic else self.rdzv.start_timeout + 5.0)

    def shutdown(self, reason: str = "finished") -> None:
        """Leave the job for good (at process exit, or `leave()`): stop the engine and
        deregister, saying why."""
        self.release(park=False)
        if self.agent is not None:
            self.agent.stop(reason)
            self.agent = None
        self.generation = None

    # -- generations ------------------------------------------------------------------

    def _on_control(self, control: ControlState) -> None:
        """Agent thread: decide whether the current generation is still usable.

        A shut-down (parked) node answers a reset of its generation as ready at once:
        it keeps its place, and connects whatever generation is current at `init()`.
        """
        with self._lock:
            gen = self.generation
            if gen is None:
                return
            latest = control.generation
            # the reset of the latest generation, which a parked node may never have
            # connected (admitted while it was shut down): it is a member all the same
            ready = (self._parked and latest is not None and control.reset_of == latest.id
                     and latest.rank_of(self.node_id) is not None)
            if control.reset_of == gen.id:
                self._interrupted.set()
            if control.status is not None and control.status.state == "failed":
                self._interrupted.set()
            if latest is not None and latest.id > gen.id:
                removed = set(gen.node_ids) - set(latest.node_ids)
                if removed or latest.rank_of(self.node_id) is None:
                    self._interrupted.set()
                else:
                    self._growth_pending = True
        if ready and self.agent is not None:
            self._answer_reset(control.reset_of)

    def _answer_reset(self, generation: int) -> None:
        """Tell the leader this node is ready for the generation after `generation`."""
        assert self.agent is not None
        if self._answered == generation:
            return
        try:
            self.agent.mark_ready(generation)
            self._answered = generation
            logger.info("node %s: ready for the generation after %d", self.node_id,
                        generation)
        except Exception:  # noqa: BLE001 - the leader then treats this node as unresponsive
            logger.warning("node %s: could not say it is ready after generation %d",
                           self.node_id, generation, exc_info=True)

    def _install(self, gen: Generation, transport: Transport, interrupted: threading.Event
                 ) -> None:
        local_rank, local_size, cross_rank, cross_size = gen.local_layout(self.node_id)
        engine = CollectiveEngine(transport, interrupted,
                                  stall=self._stall_inspector(gen, transport),
                                  max_part_bytes=self.settings.max_allgather_bytes)
        topology = Topology(gen.id, transport.rank, transport.size, local_rank, local_size,
                            cross_rank, cross_size)
        with self._lock:
            self.generation = gen
            self._interrupted = interrupted
            self._growth_pending = False
            self.runtime = GenerationRuntime(
                gen, topology, transport, engine, interrupted, self.node_id, self.rdzv.job,
                self.settings, blacklist=self._blacklist if self.agent is not None else None,
                reports=self.reports)
        os.environ.update({
            "HOROVOD_RANK": str(transport.rank), "HOROVOD_SIZE": str(transport.size),
            "HOROVOD_LOCAL_RANK": str(local_rank), "HOROVOD_LOCAL_SIZE": str(local_size),
            "HOROVOD_CROSS_RANK": str(cross_rank), "HOROVOD_CROSS_SIZE": str(cross_size),
        })
        logger.info("node %s: generation %d, rank %d of %d (%s)%s", self.node_id, gen.id,
                    transport.rank, transport.size, gen.reason,
                    f"; collectives through the relay at {gen.relay}" if gen.relay else "")

    def _stall_inspector(self, gen: Generation, transport: Transport) -> StallInspector | None:
        """The stall inspector of a generation of several ranks (`elastic.core.stall`)."""
        if transport.size < 2:
            return None
        agent = self.agent
        return StallInspector(
            self.node_id, transport.rank, transport.size, gen.id,
            self.settings.stall_check_seconds, self.settings.stall_shutdown_seconds,
            self.settings.collective_timeout,
            publish=agent.publish_activity if agent is not None else None,
            read=(lambda: read_activity(agent.backend, agent.keys.activity))
            if agent is not None else None)

    def _establish(self, after: int, timeout: float) -> None:
        """Wait for a generation newer than `after` that includes this node; connect it.

        A failed connection is reported (a ready marker) and the next generation is
        awaited; in a job that is not elastic no other generation can help, so the
        failure is raised at once. Either way the error names what could not be reached.
        """
        assert self.agent is not None
        failure: GenerationUnreachableError | None = None
        while True:
            try:
                gen = self.agent.wait_for_generation(after, timeout)
            except (RendezvousTimeoutError, RendezvousClosedError) as exc:
                if failure is not None:
                    raise failure from exc
                raise
            rank = gen.rank_of(self.node_id)
            assert rank is not None
            interrupted = threading.Event()
            with self._lock:
                self.generation = gen
                self._interrupted = interrupted
            self._on_control(self.agent.control)
            attempt = self._connects.get(gen.id, 0)
            self._connects = {gen.id: attempt + 1}
            namespace = f"{self.rdzv.job}/g{gen.id}/" + (f"c{attempt}/" if attempt else "")

            def build(gen: Generation = gen, rank: int = rank, ns: str = namespace,
                      interrupted: threading.Event = interrupted) -> Transport:
                return self._connect(gen, rank, ns, interrupted)

            try:
                transport = build_interruptibly(build, interrupted)
            except InterruptedError:
                logger.info("node %s: generation %d superseded while connecting", self.node_id,
                            gen.id)
                if self.agent.control.reset_of == gen.id:
                    self._answer_reset(gen.id)  # not in any collective: ready at once
                after = gen.id
                continue
            except GenerationUnreachableError as exc:
                failure = exc
                logger.warning("%s", exc)
                if not self.rdzv.elastic:
                    raise
                self.agent.request_reset(gen.id)
                after = gen.id
                continue
            self._install(gen, transport, interrupted)
            return

    def _connect(self, gen: Generation, rank: int, namespace: str,
                 interrupted: threading.Event | None = None) -> Transport:
        """Connect this generation's process group; GenerationUnreachableError names
        the store or the peers that could not be reached, from where. Gloo is entered
        only once every peer has arrived (`await_arrivals`); `interrupted` ends the wait."""
        me = f"node {self.node_id} (rank {rank}, address {self.settings.advertise_addr})"
        where = f"generation {gen.id} of job {self.rdzv.job}"
        arrived = namespace + "arrived/"
        try:
            store = connect_store(gen.store_host, gen.store_port, self.rdzv.start_timeout)
        except Exception as exc:  # noqa: BLE001 - named and chained below
            raise GenerationUnreachableError(
                f"{me} could not reach the store of {where} at "
                f"{gen.store_host}:{gen.store_port} (served by "
                + (f"the relay host {gen.relay}" if gen.relay else
                   f"rank 0, node {gen.members[0].node_id}")
                + f") within {self.rdzv.start_timeout:g} s: {_first_line(exc)}") from exc
        try:
            await_arrivals(store, arrived, rank, gen.size, interrupted,
                           self.settings.collective_timeout)
            return Transport(store, namespace, rank, gen.size, self.settings.collective_timeout,
                             bind_host=self.settings.advertise_addr, arrived=True,
                             relay=gen.relay, reachable=gen.members[rank].reachable)
        except InterruptedError:
            raise
        except Exception as exc:  # noqa: BLE001 - named and chained below
            peers = [(r, m) for r, m in enumerate(gen.members) if r != rank]
            try:
                missing = [(r, m) for r, m in peers if not store.check([f"{arrived}{r}"])]
            except Exception:  # noqa: BLE001 - the store itself went away
                missing = []
            if missing:
                what = ("peers that never reached the store within "
                        f"{self.settings.collective_timeout:g} s: " + _describe(missing))
            else:
                what = ("every peer reached the store, so a direct connection failed between "
                        f"this node and its peers ({_describe(peers)})")
            raise GenerationUnreachableError(
                f"{me} could not connect the process group of {where}: {what}: "
                f"{_first_line(exc)}") from exc

    def _blacklist(self, node: str, reason: str) -> None:
        """Evict `node` from the job for the job's blacklist cooldown: rank 0 does it, or
        rank 1 when the node is rank 0's own (a node never evicts itself)."""
        runtime, agent = self.runtime, self.agent
        if agent is None or runtime is None or node == runtime.node_id:
            return
        acting = 1 if runtime.members and runtime.members[0] == node else 0
        if runtime.rank != acting:
            return
        from rendezvous.agent import blacklist_node

        blacklist_node(agent.backend, agent.keys, node, reason, self.rdzv.blacklist_cooldown)

    def host_updates_pending(self) -> bool:
        """True when the leader admitted new members since this generation began."""
        return self._growth_pending

    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    def reset(self, failed: bool) -> None:
        """Leave the current generation and join the next one, in place."""
        if self.agent is None:
            if failed:
                raise HorovodInternalError(
                    "a collective failed and this process runs without a rendezvous, so "
                    "there is no other generation to join")
            return
        gen = self.generation
        assert gen is not None
        self.resets += 1
        runtime = self.runtime  # kept (closed) until the next generation replaces it
        if runtime is not None:
            runtime.engine.close()
            if runtime.transport.relay:
                runtime.transport.close()  # fails what is in flight; frees thread and socket
            else:
                self._graveyard = ([runtime.transport] + self._graveyard)[:4]
        if failed:
            try:
                self.agent.request_reset(gen.id)
            except Exception:  # noqa: BLE001 - the new generation will come anyway
                logger.warning("node %s: could not report the failed generation %d",
                               self.node_id, gen.id, exc_info=True)
        self._establish(after=gen.id, timeout=self.rdzv.elastic_timeout + self.rdzv.reset_timeout)


def _describe(members: list[tuple[int, Member]]) -> str:
    return ", ".join(f"rank {r} (node {m.node_id}, address {m.addr})" for r, m in members)


def _first_line(exc: BaseException) -> str:
    """The message of a c10d error without the C++ stack that follows it."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
