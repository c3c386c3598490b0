"""The relay path: collectives for members that can only dial out (behind NAT).

Gloo connects a full mesh, so a member that accepts no inbound connection cannot be in a
Gloo group with another such member. In a generation that has one (`Generation.relay`),
its process groups are `RelayProcessGroup`s: Python subclasses of
`torch.distributed.ProcessGroup`. Each collective is one exchange of parts: every rank
sends every other rank one part (the same for all, or one per destination), and once it
has the others' parts it reduces them in rank order, so results are bit-identical across
members. A part travels directly wherever one side of the pair listens (the member that
cannot listen dials out to the one that can, as for any outbound connection); between
two members that both cannot, a member that listens relays (chosen by the sender's rank),
and the `RelayHub` that `horderun` runs next to its coordinator only when nobody listens.
Transport: ZeroMQ (pyzmq) DEALER sockets dialling ROUTER sockets: framing, reconnection
and queuing come from a maintained library.

A silent hub (dead, or unreachable) fails every pending collective of a group that uses
it after `relay_timeout` seconds without a frame from it (the client pings while it
waits), and a collective that outlasts the collective timeout fails naming the ranks
that sent nothing: a dead relay or peer surfaces as an error (HorovodInternalError
above), never a hang.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

logger = logging.getLogger(__name__)

#: frame kinds
_HELLO, _DATA, _FORWARD, _PING, _PONG, _PROBE, _PROBED, _ERROR, _VIA, _RELAYED = (
    b"H", b"D", b"F", b"P", b"Q", b"B", b"R", b"E", b"V", b"W")
_SEQ = struct.Struct("!Q")
_RANK = struct.Struct("!I")
MAX_GROUP_ID = 512
MAX_SIZE = 4096
#: parts the hub keeps for a rank that has not said hello yet
MAX_EARLY = 64
#: how many collectives a peer's part may be ahead of this rank's
MAX_AHEAD = 1024
#: seconds an idle group's hello table is kept by the hub
HUB_EXPIRY = 600.0
PING_INTERVAL = 1.0
PROBE_TIMEOUT = 2.0


class RelayError(RuntimeError):
    """The relay failed a collective (silent hub, refused or malformed exchange)."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """`HOST:PORT` of a relay, validated; ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"relay address {text!r} must be HOST:PORT (port 1-65535)")
    return host.strip("[]"), int(port)


# -- the hub ----------------------------------------------------------------------------


class RelayHub:
    """The relay service: a ZeroMQ ROUTER that forwards parts between members that cannot
    connect to each other and answers reachability probes. Runs on a thread of its own
    until `stop()`."""

    def __init__(self, host: str, port: int = 0) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.host = host
        if port:
            self._sock.bind(f"tcp://{_bracket(host)}:{port}")
            self.port = port
        else:
            self.port = self._sock.bind_to_random_port(f"tcp://{_bracket(host)}")
        self._owners: dict[tuple[bytes, int], bytes] = {}  # (group, rank) -> identity
        self._ranks: dict[tuple[bytes, bytes], int] = {}  # (group, identity) -> rank
        self._seen: dict[bytes, float] = {}  # group -> last activity
        #: parts for a rank that has not said hello yet (it does so first thing)
        self._early: dict[tuple[bytes, int], list[list[Any]]] = {}
        self._stop = threading.Event()
        self._probes: queue.Queue[tuple[bytes, bytes]] = queue.Queue()
        self._answers: queue.Queue[list[bytes]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="horde-relay-hub", daemon=True)
        self._thread.start()
        self._probe_thread = threading.Thread(target=self._run_probes, name="horde-relay-probe",
                                              daemon=True)
        self._probe_thread.start()

    @property
    def endpoint(self) -> str:
        return f"{_bracket(self.host)}:{self.port}"

    def stop(self) -> None:
        self._stop.set()
        self._probes.put((b"", b""))
        self._thread.join(5)
        self._probe_thread.join(5)
        self._ctx.destroy(linger=0)

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        next_sweep = time.monotonic() + 30.0
        while not self._stop.is_set():
            if poller.poll(100):
                try:
                    frames = self._sock.recv_multipart(copy=False)
                except zmq.ZMQError:
                    break
                try:
                    self._handle(frames)
                except Exception:  # noqa: BLE001 - one bad message never stops the hub
                    logger.warning("relay: dropped a malformed message", exc_info=True)
            while True:
                try:
                    reply = self._answers.get_nowait()
                except queue.Empty:
                    break
                self._sock.send_multipart(reply)
            if time.monotonic() > next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + 30.0

    def _handle(self, frames: list[Any]) -> None:
        ident, kind = frames[0].bytes, frames[1].bytes
        if kind == _PING:
            self._sock.send_multipart([ident, _PONG])
        elif kind == _PROBE and len(frames) == 3:
            peer = frames[1].get("Peer-Address")
            self._probes.put((ident, f"{peer}|{frames[2].bytes.decode('ascii', 'replace')}"
                              .encode()))
        elif kind == _HELLO and len(frames) == 4:
            self._hello(ident, frames[2].bytes, frames[3].bytes)
        elif kind == _FORWARD and len(frames) >= 6:
            self._forward(ident, frames)
        else:
            self._sock.send_multipart([ident, _ERROR, b"unknown or malformed request"])

    def _refuse(self, ident: bytes, group: bytes, why: str) -> None:
        logger.warning("relay: refused a request for group %r: %s", group[:80], why)
        self._sock.send_multipart([ident, _ERROR, why.encode()])

    def _hello(self, ident: bytes, group: bytes, head: bytes) -> None:
        """A member says which rank of `group` this connection is; the first claim of a
        rank holds it."""
        if not 0 < len(group) <= MAX_GROUP_ID or len(head) != _RANK.size:
            self._refuse(ident, group[:MAX_GROUP_ID], "bad group id or rank")
            return
        (rank,) = _RANK.unpack(head)
        if rank >= MAX_SIZE:
            self._refuse(ident, group, f"rank {rank} is out of range")
            return
        owner = self._owners.setdefault((group, rank), ident)
        if owner != ident:
            self._refuse(ident, group, f"rank {rank} is already held by another connection")
            return
        self._ranks[(group, ident)] = rank
        self._seen[group] = time.monotonic()
        for message in self._early.pop((group, rank), []):
            self._sock.send_multipart([ident, *message], copy=False)

    def _forward(self, ident: bytes, frames: list[Any]) -> None:
        """Hand a part to the rank it is for; its source is the rank the sender's
        connection said hello as (a member cannot speak for another)."""
        group, dest, seq = frames[2].bytes, frames[3].bytes, frames[4].bytes
        src = self._ranks.get((group, ident))
        if src is None:
            self._refuse(ident, group[:MAX_GROUP_ID], "no hello for this group")
            return
        if len(dest) != _RANK.size or len(seq) != _SEQ.size:
            self._refuse(ident, group, "bad header")
            return
        target = self._owners.get((group, _RANK.unpack(dest)[0]))
        if target is None:  # not connected yet: it says hello before anything else, so
            early = self._early.setdefault((group, _RANK.unpack(dest)[0]), [])
            if len(early) < MAX_EARLY:  # keep it for that hello
                early.append([_DATA, seq, _RANK.pack(src), *frames[5:]])
            return
        self._seen[group] = time.monotonic()
        self._sock.send_multipart([target, _DATA, seq, _RANK.pack(src), *frames[5:]],
                                  copy=False)

    def _sweep(self) -> None:
        now = time.monotonic()
        for group in [g for g, t in self._seen.items() if now - t > HUB_EXPIRY]:
            del self._seen[group]
            for key in [k for k in self._owners if k[0] == group]:
                del self._owners[key]
            for key in [k for k in self._ranks if k[0] == group]:
                del self._ranks[key]
            for key in [k for k in self._early if k[0] == group]:
                del self._early[key]

    def _run_probes(self) -> None:
        """Dial back the address a probe came from, at the port it names (never any
        other address: the hub is no port scanner for others)."""
        while not self._stop.is_set():
            ident, request = self._probes.get()
            if self._stop.is_set():
                return
            peer, _, rest = request.decode("ascii", "replace").partition("|")
            claimed, _, port = rest.rpartition(":")
            ok = False
            try:
                same = ipaddress.ip_address(peer) == ipaddress.ip_address(claimed.strip("[]"))
                if same and port.isdigit() and 1 <= int(port) <= 65535:
                    with socket.create_connection((peer, int(port)), timeout=PROBE_TIMEOUT):
                        ok = True
            except (OSError, ValueError):
                ok = False
            logger.info("relay: %s:%s (seen from %s) %s inbound connections", claimed, port,
                        peer, "accepts" if ok else "does not accept")
            self._answers.put([ident, _PROBED, b"1" if ok else b"0", peer.encode()])


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def probe_reachable(relay: str, addr: str, port: int, timeout: float = 10.0) -> bool:
    """Ask the relay hub to dial `addr:port` back: True when it could (this node accepts
    inbound connections there, and `addr` is the address the hub sees it come from)."""
    import zmq

    host, hub_port = parse_endpoint(relay)
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{_bracket(host)}:{hub_port}")
        sock.send_multipart([_PROBE, f"{addr}:{port}".encode()])
        if not sock.poll(int(timeout * 1000)):
            raise RelayError(f"the relay at {relay} did not answer a reachability probe "
                             f"within {timeout:g} s")
        frames = sock.recv_multipart()
        if len(frames) < 2 or frames[0] != _PROBED:
            raise RelayError(f"the relay at {relay} answered the probe with {frames[:1]!r}")
        return frames[1] == b"1"
    finally:
        ctx.destroy(linger=0)


# -- the client side --------------------------------------------------------------------


class RelayWork(dist._Work):
    """One collective in flight through the relay: completes when the hub's answer has
    been applied to the output tensors (or fails with the reason)."""

    def __init__(self, result: Any = None) -> None:
        super().__init__()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._future: Future = Future()
        self._result = result

    def _finish(self, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self._error = error
        self._done.set()
        if error is None:
            self._future.set_result(self._result)
        else:
            self._future.set_exception(error)

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:  # type: ignore[override]
        seconds = timeout.total_seconds() if timeout else None
        if seconds is not None and seconds <= 0:
            seconds = None
        if not self._done.wait(seconds):
            raise RuntimeError(f"relay collective not finished within {seconds} s")
        if self._error is not None:
            raise RuntimeError(str(self._error)) from self._error
        return True

    def is_completed(self) -> bool:
        return self._done.is_set()

    def is_success(self) -> bool:
        return self._done.is_set() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def get_future(self) -> Future:
        return self._future



class _Mesh:
    """The connections of one group and the thread that owns them (ZeroMQ sockets are
    not thread-safe: callers hand messages over a queue and wake the thread).

    `peers[r]` is rank r's listening address, or "" when it accepts no inbound
    connection. A part for rank d goes over a connection this rank dialled to d when d
    listens; over the connection d dialled to this rank when only this rank listens; and
    through the hub when neither does. Every connection starts with a hello naming the
    sender's rank, so each side knows who is at the other end without trusting frames.
    """

    def __init__(self, hub: str, group: bytes, rank: int, size: int, peers: list[str],
                 router: Any, ctx: Any, hub_timeout: float,
                 on_part: Callable[[int, int, bytes], None],
                 on_failure: Callable[[BaseException], None], label: str) -> None:
        import zmq

        self._zmq = zmq
        self.hub_endpoint = hub
        self.group, self.rank, self.size, self.peers = group, rank, size, peers
        self.hub_timeout = hub_timeout
        self._on_part, self._on_failure = on_part, on_failure
        self._ctx = ctx
        self._router = router  # bound when this rank listens, else None
        hello = [_HELLO, group, _RANK.pack(rank)]
        self._hub = self._dial(hub)
        self._hub.send_multipart(hello)
        self._dealers: dict[int, Any] = {}
        for peer, addr in enumerate(peers):
            if addr and peer != rank:
                self._dealers[peer] = self._dial(addr)
                self._dealers[peer].send_multipart(hello)
        self._inbound: dict[int, bytes] = {}  # rank -> identity at our router
        self._inbound_rank: dict[bytes, int] = {}
        self._held: dict[int, list[list[Any]]] = {}  # parts for a rank not connected yet
        self._wake_in = ctx.socket(zmq.PAIR)
        self._wake_out = ctx.socket(zmq.PAIR)
        addr = f"inproc://relay-wake-{id(self)}"
        self._wake_out.bind(addr)
        self._wake_in.connect(addr)
        self._wake_lock = threading.Lock()
        self._outbox: queue.Queue[tuple[int, list[Any]]] = queue.Queue()
        self._closed = threading.Event()
        self.busy = 0  # collectives started and not finished (owned by the group's lock)
        #: called with the time on every turn of the loop (at least every 0.2 s)
        self.on_tick: Callable[[float], None] | None = None
        #: the ranks that listen: they relay between pairs that both do not
        self.relays = [r for r in range(size) if peers[r]]
        self.uses_hub = not self.relays
        self._thread = threading.Thread(target=self._run, name=f"horde-relay-{label}",
                                        daemon=True)
        self._thread.start()

    def _dial(self, endpoint: str) -> Any:
        host, port = parse_endpoint(endpoint)
        sock = self._ctx.socket(self._zmq.DEALER)
        sock.setsockopt(self._zmq.LINGER, 0)
        sock.connect(f"tcp://{_bracket(host)}:{port}")
        return sock

    def send(self, dest: int, frames: list[Any]) -> None:
        """Queue `frames` ([seq, payload]) for rank `dest`."""
        self._outbox.put((dest, frames))
        with self._wake_lock:
            if not self._closed.is_set():
                self._wake_in.send(b"", self._zmq.NOBLOCK)

    def close(self) -> None:
        self._closed.set()
        with self._wake_lock:
            try:
                self._wake_in.send(b"", self._zmq.NOBLOCK)
            except self._zmq.ZMQError:
                pass
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    def relay_for(self, src: int) -> int | None:
        """The listening member that relays the parts `src` sends to other members that
        do not listen (spread by sender, so no one member carries every pair); None: the
        hub (nobody listens)."""
        return self.relays[src % len(self.relays)] if self.relays else None

    def _deliver(self, dest: int, frames: list[Any]) -> None:
        seq, payload = frames
        if dest in self._dealers:
            self._dealers[dest].send_multipart([_DATA, seq, _RANK.pack(self.rank), payload],
                                               copy=False)
        elif self._router is not None:
            self._to_inbound(dest, [_DATA, seq, _RANK.pack(self.rank), payload])
        elif self.relays:
            via = self.relay_for(self.rank)
            self._dealers[via].send_multipart([_VIA, _RANK.pack(dest), seq, payload],
                                              copy=False)
        else:
            self._hub.send_multipart([_FORWARD, self.group, _RANK.pack(dest), seq, payload],
                                     copy=False)

    def _to_inbound(self, dest: int, message: list[Any]) -> None:
        """Send over the connection `dest` dialled to this rank (held until its hello)."""
        ident = self._inbound.get(dest)
        if ident is None:
            self._held.setdefault(dest, []).append(message)
            return
        self._router.send_multipart([ident, *message], copy=False)

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._wake_out, zmq.POLLIN)
        poller.register(self._hub, zmq.POLLIN)
        for sock in self._dealers.values():
            poller.register(sock, zmq.POLLIN)
        if self._router is not None:
            poller.register(self._router, zmq.POLLIN)
        from_dealer = {sock: peer for peer, sock in self._dealers.items()}
        heard = time.monotonic()
        next_ping = heard + PING_INTERVAL
        try:
            while not self._closed.is_set():
                ready = dict(poller.poll(200))
                for sock in ready:
                    if sock is self._wake_out:
                        while self._wake_out.poll(0):
                            self._wake_out.recv()
                        while True:
                            try:
                                dest, frames = self._outbox.get_nowait()
                            except queue.Empty:
                                break
                            self._deliver(dest, frames)
                    elif sock is self._hub:
                        while self._hub.poll(0):
                            heard = time.monotonic()
                            self._from_hub(self._hub.recv_multipart())
                    elif sock is self._router:
                        while self._router.poll(0):
                            self._from_router(self._router.recv_multipart())
                    else:
                        peer = from_dealer[sock]
                        while sock.poll(0):
                            self._part(peer, sock.recv_multipart())
                now = time.monotonic()
                if self.on_tick is not None:
                    self.on_tick(now)
                if self.busy <= 0 or not self.uses_hub:
                    heard = now  # nothing awaited from the hub: silence is no failure
                elif now - heard > self.hub_timeout:
                    self._on_failure(RelayError(
                        f"the relay at {self.hub_endpoint} did not answer for "
                        f"{self.hub_timeout:g} s (it died, or the network to it failed)"))
                    heard = now
                if now >= next_ping and self.busy > 0 and self.uses_hub:
                    self._hub.send_multipart([_PING])
                    next_ping = now + PING_INTERVAL
        finally:
            for sock in [self._wake_in, self._wake_out, self._hub, *self._dealers.values(),
                         *([self._router] if self._router is not None else [])]:
                sock.close(0)
            self._ctx.term()

    def _from_hub(self, frames: list[bytes]) -> None:
        kind = frames[0]
        if kind == _DATA and len(frames) == 4 and len(frames[2]) == _RANK.size:
            self._part(_RANK.unpack(frames[2])[0], frames, trusted=True)
        elif kind == _ERROR:
            why = frames[1].decode("utf-8", "replace") if len(frames) > 1 else "refused"
            self._on_failure(RelayError(f"the relay at {self.hub_endpoint} refused: {why}"))

    def _from_router(self, frames: list[bytes]) -> None:
        ident, kind = frames[0], frames[1]
        if kind == _HELLO and len(frames) == 4 and frames[2] == self.group and \
                len(frames[3]) == _RANK.size:
            (peer,) = _RANK.unpack(frames[3])
            if not 0 <= peer < self.size or peer == self.rank or peer in self._inbound:
                logger.warning("relay: group %r: refused a hello as rank %d", self.group[:80],
                               peer)
                return
            self._inbound[peer], self._inbound_rank[ident] = ident, peer
            for held in self._held.pop(peer, []):
                self._router.send_multipart([ident, *held], copy=False)
        elif kind == _DATA and ident in self._inbound_rank:
            self._part(self._inbound_rank[ident], frames[1:])
        elif kind == _VIA and ident in self._inbound_rank and len(frames) == 5 and \
                len(frames[2]) == _RANK.size and len(frames[3]) == _SEQ.size:
            src, (dest,) = self._inbound_rank[ident], _RANK.unpack(frames[2])
            if not 0 <= dest < self.size or self.peers[dest] or self.peers[src] or \
                    self.relay_for(src) != self.rank:
                logger.warning("relay: group %r: rank %d asked to relay to rank %d, which is "
                               "not a pair this rank relays; dropped", self.group[:80], src,
                               dest)
                return
            self._to_inbound(dest, [_RELAYED, frames[3], _RANK.pack(src), frames[4]])

    def _part(self, peer: int, frames: list[bytes], trusted: bool = False) -> None:
        """A part from `peer` (known from the connection, or from the hub's hello table):
        [DATA, seq, src, payload]; a frame that claims another source is dropped. A part
        relayed by a member ([RELAYED, ...]) is taken only from the member that relays
        its source's parts, for a source that does not listen."""
        if frames and frames[0] == _RELAYED and len(frames) == 4 and \
                len(frames[2]) == _RANK.size:
            (src,) = _RANK.unpack(frames[2])
            if 0 <= src < self.size and not self.peers[src] and self.relay_for(src) == peer:
                frames, peer, trusted = [_DATA, *frames[1:]], src, True
        if len(frames) != 4 or frames[0] != _DATA or len(frames[1]) != _SEQ.size:
            logger.warning("relay: group %r: dropped a malformed part from rank %d",
                           self.group[:80], peer)
            return
        if not trusted and _RANK.unpack(frames[2])[0] != peer:
            logger.warning("relay: group %r: rank %d sent a part as another rank; dropped",
                           self.group[:80], peer)
            return
        if not 0 <= peer < self.size or peer == self.rank:
            return
        self._on_part(_SEQ.unpack(frames[1])[0], peer, frames[3])


def _reducer(op: Any) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    if op == dist.ReduceOp.SUM:
        return lambda acc, x: acc.add_(x)
    if op == dist.ReduceOp.MIN:
        return lambda acc, x: torch.minimum(acc, x, out=acc)
    if op == dist.ReduceOp.MAX:
        return lambda acc, x: torch.maximum(acc, x, out=acc)
    if op == dist.ReduceOp.PRODUCT:
        return lambda acc, x: acc.mul_(x)
    raise ValueError(f"the relay transport does not support reduce op {op}")


def _to_bytes(tensor: torch.Tensor) -> bytes:
    """A copy of the tensor's bytes: a part may still wait to be sent (a peer that has not
    dialled in yet) when the collective writes its result into the tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _from_bytes(blob: bytes, like: torch.Tensor, what: str) -> torch.Tensor:
    expected = like.numel() * like.element_size()
    if len(blob) != expected:
        raise RelayError(f"{what}: a peer sent {len(blob)} bytes where {expected} were "
                         "expected (the ranks disagree on the collective)")
    if expected == 0:
        return torch.empty(like.shape, dtype=like.dtype)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(like.dtype).reshape(
        like.shape)




def _peer_address(raw: bytes, peer: int) -> str:
    """Where rank `peer` listens, as it published it in the store ("" when it does not)."""
    text = raw.decode("ascii", "replace")
    if text == "-":
        return ""
    try:
        parse_endpoint(text)
    except ValueError as exc:
        raise RelayError(f"rank {peer} published an invalid relay address: {exc}") from None
    return text


class RelayProcessGroup(dist.ProcessGroup):
    """A process group for a generation with members that accept no inbound connection
    (see the module doc): parts go directly wherever one side listens, through the hub
    otherwise.

    Implements what Horde's engine, gradient channel and staleness rounds call:
    allreduce, allgather, broadcast, barrier and alltoall_base, on CPU tensors (CUDA
    tensors are staged through host memory). With `store`, each rank publishes where it
    listens (when `reachable`, on `bind_host`); without, every part goes through the hub.
    """

    _ids = itertools.count()

    def __init__(self, endpoint: str, group_id: str, rank: int, size: int,
                 timeout: float, relay_timeout: float, store: dist.Store | None = None,
                 reachable: bool = False, bind_host: str | None = None) -> None:
        import zmq

        super().__init__(rank, size)
        self._group = group_id.encode()[:MAX_GROUP_ID]
        self._rank, self._size = rank, size
        self._timeout = timeout
        self._seq = 0
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[RelayWork, Callable[[list[bytes]], None], bytes,
                                       float]] = {}
        self._parts: dict[int, dict[int, bytes]] = {}
        self._failed: BaseException | None = None
        ctx = zmq.Context()
        router, me = None, "-"
        try:
            if store is not None and reachable and bind_host:
                router = ctx.socket(zmq.ROUTER)
                router.setsockopt(zmq.LINGER, 0)
                port = router.bind_to_random_port(f"tcp://{_bracket(bind_host)}")
                me = f"{_bracket(bind_host)}:{port}"
            peers = [""] * size
            if store is not None:
                store.set(f"{rank}", me)
                for peer in range(size):
                    peers[peer] = _peer_address(store.get(f"{peer}"), peer)
            self._mesh = _Mesh(endpoint, self._group, rank, size, peers, router, ctx,
                               relay_timeout, self._on_part, self._on_failure,
                               f"{next(self._ids)}")
        except BaseException:
            ctx.destroy(linger=0)
            raise
        self._mesh.on_tick = self._expire
        direct = sum(1 for p in range(size) if p != rank and (peers[p] or peers[rank]))
        logger.debug("relay group %s: rank %d of %d, %d peer(s) direct, %d through the hub",
                     group_id, rank, size, direct, size - 1 - direct)

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return "relay"

    # -- plumbing ---------------------------------------------------------------------

    def _start(self, parts: Sequence[Any] | None, per_rank: bool,
               apply: Callable[[list[bytes]], None], result: Any = None) -> RelayWork:
        work = RelayWork(result)
        parts = list(parts) if parts else [b""]
        mine = parts[self._rank] if per_rank else parts[0]
        with self._lock:
            if self._failed is not None:
                work._finish(RelayError(str(self._failed)))
                return work
            seq = self._seq
            self._seq += 1
            self._waiting[seq] = (work, apply, mine, time.monotonic())
            self._mesh.busy = len(self._waiting)
        head = _SEQ.pack(seq)
        for dest in range(self._size):
            if dest != self._rank:
                self._mesh.send(dest, [head, parts[dest] if per_rank else parts[0]])
        self._complete(seq)
        return work

    def _on_part(self, seq: int, src: int, payload: bytes) -> None:
        with self._lock:
            if (seq < self._seq and seq not in self._waiting) or seq > self._seq + MAX_AHEAD:
                return  # done (or failed) already, or absurdly far ahead: not ours
            got = self._parts.setdefault(seq, {})
            if src in got:
                logger.warning("relay group %r: rank %d sent collective %d twice; the second "
                               "copy is dropped", self._group[:80], src, seq)
                return
            got[src] = payload
        self._complete(seq)

    def _complete(self, seq: int) -> None:
        with self._lock:
            got = self._parts.get(seq, {})
            if seq not in self._waiting or len(got) < self._size - 1:
                return
            work, apply, mine, _started = self._waiting.pop(seq)
            del self._parts[seq]
            self._mesh.busy = len(self._waiting)
        blobs = [got[src] if src != self._rank else mine for src in range(self._size)]
        try:
            apply(blobs)
        except Exception as exc:  # noqa: BLE001 - handed to the waiter
            work._finish(exc)
            return
        work._finish()

    def _expire(self, now: float) -> None:
        """Fail the collectives that waited longer than the collective timeout."""
        with self._lock:
            late = [seq for seq, entry in self._waiting.items()
                    if now - entry[3] > self._timeout]
            if not late:
                return
            missing = sorted(set(range(self._size)) - {self._rank}
                             - set(self._parts.get(late[0], {})))
        self._on_failure(RelayError(
            f"collective {late[0]} of group {self._group.decode(errors='replace')} did not "
            f"complete within {self._timeout:g} s: nothing arrived from ranks {missing}"))

    def _on_failure(self, error: BaseException) -> None:
        with self._lock:
            self._failed = error
            waiting, self._waiting = self._waiting, {}
            self._parts.clear()
            mesh = getattr(self, "_mesh", None)  # None: the constructor failed
            if mesh is not None:
                mesh.busy = 0
        for work, _apply, _mine, _started in waiting.values():
            work._finish(error)

    def abort(self) -> None:
        """Fail whatever is in flight and close the connections."""
        self._on_failure(RelayError("the process group was closed"))
        mesh = getattr(self, "_mesh", None)
        if mesh is not None:
            mesh.close()

    def shutdown(self) -> None:
        self.abort()

    # -- collectives ------------------------------------------------------------------

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> RelayWork:
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        reduce = _reducer(op)
        (tensor,) = tensors

        def apply(blobs: list[bytes]) -> None:
            acc = _from_bytes(blobs[0], tensor, "allreduce").clone()
            for blob in blobs[1:]:
                reduce(acc, _from_bytes(blob, tensor, "allreduce"))
            tensor.copy_(acc)

        return self._start([_to_bytes(tensor)], False, apply, tensors)

    def allgather(self, output_tensors: list[list[torch.Tensor]],
                  input_tensors: list[torch.Tensor], opts: Any = None) -> RelayWork:
        (outs,), (tensor,) = output_tensors, input_tensors
        if len(outs) != self._size:
            raise ValueError(f"allgather needs {self._size} output tensors, got {len(outs)}")

        def apply(blobs: list[bytes]) -> None:
            for out, blob in zip(outs, blobs):
                out.copy_(_from_bytes(blob, out, "allgather"))

        return self._start([_to_bytes(tensor)], False, apply, output_tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> RelayWork:
        root = opts.rootRank if opts is not None else 0
        (tensor,) = tensors

        def apply(blobs: list[bytes]) -> None:
            if self._rank != root:
                tensor.copy_(_from_bytes(blobs[root], tensor, "broadcast"))

        part = _to_bytes(tensor) if self._rank == root else b""
        return self._start([part], False, apply, tensors)

    def barrier(self, opts: Any = None) -> RelayWork:
        return self._start(None, False, lambda _blobs: None)

    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                      output_split_sizes: list[int], input_split_sizes: list[int],
                      opts: Any = None) -> RelayWork:
        rows_in = list(input_split_sizes) or [input.shape[0] // self._size] * self._size
        rows_out = list(output_split_sizes) or [output.shape[0] // self._size] * self._size
        pieces = list(torch.split(input, rows_in, dim=0))
        outs = list(torch.split(output, rows_out, dim=0))

        def apply(blobs: list[bytes]) -> None:
            for out, blob in zip(outs, blobs):
                out.copy_(_from_bytes(blob, out, "alltoall"))

        return self._start([_to_bytes(p) for p in pieces], True, apply, [output])


__all__ = ["RelayError", "RelayHub", "RelayProcessGroup", "RelayWork", "parse_endpoint",
           "probe_reachable"]
