"""The worker's side of membership: joins generations and owns their transport.

A `WorkerContext` lives from `hvd.init()` to `hvd.shutdown()`. It registers the
process with the rendezvous (through a `NodeAgent`), waits to be admitted to a
generation, connects that generation's process group, and rebuilds it in place
when the membership changes. Without a rendezvous (a plain `python train.py`) it
forms a world of one, as Horovod does.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

import torch.distributed as dist

from elastic.engine import CollectiveEngine
from elastic.errors import HorovodInternalError
from elastic.settings import WorkerSettings, horovod_notes
from elastic.stall import StallInspector, read_activity
from elastic.transport import Transport, build_interruptibly, connect_store, serve_store
from rendezvous.agent import ControlState, NodeAgent
from rendezvous.generation import Generation, Member, NodeInfo
from rendezvous.settings import RendezvousSettings

logger = logging.getLogger(__name__)

_noted = False
"""Whether this process logged its notes on Horovod variables (once, not per init)."""


@dataclass(frozen=True)
class Topology:
    """Rank layout of this worker in its current generation."""

    generation: int
    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int


class WorkerContext:
    """Membership and transport of this process, generation after generation."""

    def __init__(self, settings: WorkerSettings, rendezvous: RendezvousSettings) -> None:
        self.settings = settings
        self.rdzv = rendezvous
        self.node_id = settings.node_id
        self.agent: NodeAgent | None = None
        self.generation: Generation | None = None
        self.topology: Topology | None = None
        self.engine: CollectiveEngine | None = None
        self.transport: Transport | None = None
        self._interrupted = threading.Event()
        self._growth_pending = False
        self._lock = threading.Lock()
        self._store_server: dist.TCPStore | None = None
        self._graveyard: list[object] = []
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
        backend = backend_from_url(self.settings.rendezvous)
        info = NodeInfo(node_id=self.node_id, host=self.settings.hostname,
                        addr=self.settings.advertise_addr,
                        store_port=self._store_server.port, pid=os.getpid(),
                        order=self.settings.order, batch=self.settings.batch,
                        batch_size=self.settings.batch_size)
        self.agent = NodeAgent(backend, self.rdzv, info)
        self.agent.add_listener(self._on_control)
        self.agent.start()
        if self.rdzv.elastic and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._request_leave)
        self._establish(after=-1, timeout=self.rdzv.start_timeout + self.rdzv.elastic_timeout
                        if self.rdzv.elastic else self.rdzv.start_timeout + 5.0)

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

    def shutdown(self, reason: str = "finished") -> None:
        """Leave the job: stop the engine, deregister, stop this process's store."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.agent is not None:
            self.agent.stop(reason)
            self.agent = None
        self.transport = None
        self.generation = None
        self.topology = None

    # -- generations ------------------------------------------------------------------

    def _on_control(self, control: ControlState) -> None:
        """Agent thread: decide whether the current generation is still usable."""
        with self._lock:
            gen = self.generation
            if gen is None:
                return
            latest = control.generation
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

    def _install(self, gen: Generation, transport: Transport, interrupted: threading.Event
                 ) -> None:
        local_rank, local_size, cross_rank, cross_size = gen.local_layout(self.node_id)
        with self._lock:
            self.generation = gen
            self.transport = transport
            self._interrupted = interrupted
            self._growth_pending = False
            self.engine = CollectiveEngine(transport, interrupted,
                                           stall=self._stall_inspector(gen, transport))
            self.topology = Topology(gen.id, transport.rank, transport.size, local_rank,
                                     local_size, cross_rank, cross_size)
        os.environ.update({
            "HOROVOD_RANK": str(transport.rank), "HOROVOD_SIZE": str(transport.size),
            "HOROVOD_LOCAL_RANK": str(local_rank), "HOROVOD_LOCAL_SIZE": str(local_size),
            "HOROVOD_CROSS_RANK": str(cross_rank), "HOROVOD_CROSS_SIZE": str(cross_size),
        })
        logger.info("node %s: generation %d, rank %d of %d (%s)", self.node_id, gen.id,
                    transport.rank, transport.size, gen.reason)

    def _stall_inspector(self, gen: Generation, transport: Transport) -> StallInspector | None:
        """The stall inspector of a generation of several ranks (`elastic.stall`)."""
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
        assert self.agent is not None
        while True:
            gen = self.agent.wait_for_generation(after, timeout)
            rank = gen.rank_of(self.node_id)
            assert rank is not None
            interrupted = threading.Event()
            with self._lock:
                self.generation = gen
                self._interrupted = interrupted
            self._on_control(self.agent.control)
            namespace = f"{self.rdzv.job}/g{gen.id}/"

            def build(gen: Generation = gen, rank: int = rank, ns: str = namespace) -> Transport:
                store = connect_store(gen.store_host, gen.store_port, self.rdzv.start_timeout)
                return Transport(store, ns, rank, gen.size, self.settings.collective_timeout,
                                 bind_host=self.settings.advertise_addr)

            try:
                transport = build_interruptibly(build, interrupted)
            except InterruptedError:
                logger.info("node %s: generation %d superseded while connecting", self.node_id,
                            gen.id)
                after = gen.id
                continue
            except Exception as exc:  # noqa: BLE001 - a peer never connected
                logger.warning("node %s: connecting generation %d failed: %s", self.node_id,
                               gen.id, exc)
                self.agent.request_reset(gen.id)
                after = gen.id
                continue
            self._install(gen, transport, interrupted)
            return

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
        if self.engine is not None:
            self.engine.close()
        self._graveyard = ([self.transport] + self._graveyard)[:4]
        if failed:
            try:
                self.agent.request_reset(gen.id)
            except Exception:  # noqa: BLE001 - the new generation will come anyway
                logger.warning("node %s: could not report the failed generation %d",
                               self.node_id, gen.id, exc_info=True)
        self._establish(after=gen.id, timeout=self.rdzv.elastic_timeout + self.rdzv.reset_timeout)


