"""The relay path: collectives for members that can only dial out (behind NAT).

Gloo connects a full mesh, so a member that accepts no inbound connection cannot be in a
Gloo group with another such member. In a generation that has one (`Generation.relay`),
every member instead dials out to a `RelayHub` that `horderun` runs next to its
coordinator, and its process groups are `RelayProcessGroup`s: Python subclasses of
`torch.distributed.ProcessGroup` whose collectives are one exchange through the hub.

The hub is payload-agnostic: for collective number `seq` of a group, each of the `size`
ranks sends either one part for everyone or one part per destination rank; once all
have sent, each rank receives the parts addressed to it, in rank order. Every member then
reduces the same bytes in the same order, so results are bit-identical across members.
A rank's own part is not sent back to it (it keeps a copy), which saves 1/size of the
hub's outgoing traffic.
Transport: ZeroMQ (pyzmq) DEALER sockets dialling one ROUTER: framing, reconnection and
queuing come from a maintained library, and only the hub needs an open port.

A silent hub (dead, or unreachable) fails every pending collective after
`relay_timeout` seconds without a frame from it (the client pings while it waits), so a
dead relay surfaces as an error of the collective (HorovodInternalError above), not a hang.
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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

logger = logging.getLogger(__name__)

#: frame kinds
_CONTRIB, _RESULT, _PING, _PONG, _PROBE, _PROBED, _ERROR = (
    b"C", b"R", b"P", b"Q", b"B", b"D", b"E")
_ALL, _PER = b"A", b"P"
_HEAD = struct.Struct("!QII")  # seq, rank, size
MAX_GROUP_ID = 512
MAX_SIZE = 4096
#: the most bytes one rank may send in one collective (all its parts together)
MAX_CONTRIBUTION = 2 * 1024**3
#: seconds an unfinished collective (or an idle group) is kept by the hub
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


@dataclass
class _Pending:
    size: int
    started: float
    parts: dict[int, tuple[bytes, list[Any]]] = field(default_factory=dict)


class RelayHub:
    """The relay service: a ZeroMQ ROUTER that completes exchanges among a group's ranks
    and answers reachability probes. Runs on a thread of its own until `stop()`."""

    def __init__(self, host: str, port: int = 0) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.host = host
        if port:
            self._sock.bind(f"tcp://{_bracket(host)}:{port}")
            self.port = port
        else:
            self.port = self._sock.bind_to_random_port(f"tcp://{_bracket(host)}")
        self._pending: dict[tuple[bytes, int], _Pending] = {}
        self._owners: dict[tuple[bytes, int], bytes] = {}  # (group, rank) -> identity
        self._seen: dict[bytes, float] = {}  # group -> last activity
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
        elif kind == _CONTRIB and len(frames) >= 6:
            self._contribution(ident, frames)
        else:
            self._sock.send_multipart([ident, _ERROR, b"", b"unknown or malformed request"])

    def _refuse(self, ident: bytes, group: bytes, why: str) -> None:
        logger.warning("relay: refused a contribution to group %r: %s", group[:80], why)
        self._sock.send_multipart([ident, _ERROR, group, why.encode()])

    def _contribution(self, ident: bytes, frames: list[Any]) -> None:
        group = frames[2].bytes
        if not 0 < len(group) <= MAX_GROUP_ID or len(frames[3].bytes) != _HEAD.size:
            self._refuse(ident, group[:MAX_GROUP_ID], "bad group id or header")
            return
        seq, rank, size = _HEAD.unpack(frames[3].bytes)
        mode, parts = frames[4].bytes, frames[5:]
        if not 1 <= size <= MAX_SIZE or rank >= size:
            self._refuse(ident, group, f"rank {rank} of size {size} is out of range")
            return
        if (mode == _ALL and len(parts) != 1) or (mode == _PER and len(parts) != size) or \
                mode not in (_ALL, _PER):
            self._refuse(ident, group, "wrong number of parts")
            return
        if sum(len(p) for p in parts) > MAX_CONTRIBUTION:
            self._refuse(ident, group, "contribution too large")
            return
        owner = self._owners.setdefault((group, rank), ident)
        if owner != ident:
            self._refuse(ident, group, f"rank {rank} is already held by another connection")
            return
        self._seen[group] = time.monotonic()
        pending = self._pending.setdefault((group, seq), _Pending(size, time.monotonic()))
        if pending.size != size or rank in pending.parts:
            self._refuse(ident, group, f"collective {seq}: size disagrees or rank {rank} "
                         "sent twice")
            return
        pending.parts[rank] = (mode, parts)
        if len(pending.parts) < size:
            return
        del self._pending[(group, seq)]
        head = struct.pack("!Q", seq)
        for dest in range(size):
            out: list[Any] = [self._owners[(group, dest)], _RESULT, group, head]
            for src in range(size):
                if src == dest:
                    continue  # a rank keeps its own part: the hub's link carries less
                src_mode, src_parts = pending.parts[src]
                out.append(src_parts[0] if src_mode == _ALL else src_parts[dest])
            self._sock.send_multipart(out, copy=False)

    def _sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, p in self._pending.items() if now - p.started > HUB_EXPIRY]:
            del self._pending[key]
        for group in [g for g, t in self._seen.items() if now - t > HUB_EXPIRY]:
            del self._seen[group]
            for key in [k for k in self._owners if k[0] == group]:
                del self._owners[key]

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


class _Channel:
    """One DEALER connection to the hub and the thread that owns it (ZeroMQ sockets are
    not thread-safe: callers hand messages over a queue and wake the thread)."""

    def __init__(self, endpoint: str, timeout: float, on_result: Callable[[int, list[bytes]],
                 None], on_failure: Callable[[BaseException], None], label: str) -> None:
        import zmq

        self._zmq = zmq
        host, port = parse_endpoint(endpoint)
        self.endpoint = endpoint
        self.timeout = timeout
        self._on_result, self._on_failure = on_result, on_failure
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"tcp://{_bracket(host)}:{port}")
        self._wake_in = self._ctx.socket(zmq.PAIR)
        self._wake_out = self._ctx.socket(zmq.PAIR)
        addr = f"inproc://relay-wake-{id(self)}"
        self._wake_out.bind(addr)
        self._wake_in.connect(addr)
        self._wake_lock = threading.Lock()
        self._outbox: queue.Queue[list[Any]] = queue.Queue()
        self._closed = threading.Event()
        self.busy = 0  # collectives sent and not answered (owned by the group's lock)
        self._thread = threading.Thread(target=self._run, name=f"horde-relay-{label}",
                                        daemon=True)
        self._thread.start()

    def send(self, frames: list[Any]) -> None:
        self._outbox.put(frames)
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
        self._thread.join(5)

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_out, zmq.POLLIN)
        heard = time.monotonic()
        next_ping = heard + PING_INTERVAL
        try:
            while not self._closed.is_set():
                ready = dict(poller.poll(200))
                if self._wake_out in ready:
                    while self._wake_out.poll(0):
                        self._wake_out.recv()
                    while True:
                        try:
                            frames = self._outbox.get_nowait()
                        except queue.Empty:
                            break
                        self._sock.send_multipart(frames, copy=False)
                if self._sock in ready:
                    while self._sock.poll(0):
                        frames = self._sock.recv_multipart()
                        heard = time.monotonic()
                        self._dispatch(frames)
                now = time.monotonic()
                if self.busy <= 0:
                    heard = now  # nothing awaited: silence is no failure
                elif now - heard > self.timeout:
                    self._on_failure(RelayError(
                        f"the relay at {self.endpoint} did not answer for {self.timeout:g} s "
                        "(it died, or the network to it failed)"))
                    heard = now
                if now >= next_ping and self.busy > 0:
                    self._sock.send_multipart([_PING])
                    next_ping = now + PING_INTERVAL
        finally:
            self._wake_in.close(0)
            self._wake_out.close(0)
            self._sock.close(0)
            self._ctx.term()

    def _dispatch(self, frames: list[bytes]) -> None:
        kind = frames[0]
        if kind == _RESULT and len(frames) >= 3 and len(frames[2]) == 8:
            (seq,) = struct.unpack("!Q", frames[2])
            self._on_result(seq, frames[3:])
        elif kind == _ERROR:
            why = frames[2].decode("utf-8", "replace") if len(frames) > 2 else "refused"
            self._on_failure(RelayError(f"the relay at {self.endpoint} refused: {why}"))


_OPS: dict[Any, Callable[[torch.Tensor, torch.Tensor], Any]] = {}


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


def _to_bytes(tensor: torch.Tensor) -> bytes | memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _from_bytes(blob: bytes, like: torch.Tensor, what: str) -> torch.Tensor:
    expected = like.numel() * like.element_size()
    if len(blob) != expected:
        raise RelayError(f"{what}: a peer sent {len(blob)} bytes where {expected} were "
                         "expected (the ranks disagree on the collective)")
    if expected == 0:
        return torch.empty(like.shape, dtype=like.dtype)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(like.dtype).reshape(
        like.shape)


class RelayProcessGroup(dist.ProcessGroup):
    """A process group whose collectives go through a `RelayHub` (see the module doc).

    Implements what Horde's engine, gradient channel and staleness rounds call:
    allreduce, allgather, broadcast, barrier and alltoall_base, on CPU tensors (CUDA
    tensors are staged through host memory).
    """

    _ids = itertools.count()

    def __init__(self, endpoint: str, group_id: str, rank: int, size: int,
                 timeout: float, relay_timeout: float) -> None:
        super().__init__(rank, size)
        self._group = group_id.encode()[:MAX_GROUP_ID]
        self._rank, self._size = rank, size
        self._timeout = timeout
        self._seq = 0
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[RelayWork, Callable[[list[bytes]], None], Any]] = {}
        self._failed: BaseException | None = None
        self._channel = _Channel(endpoint, relay_timeout, self._on_result, self._on_failure,
                                 f"{next(self._ids)}")

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return "relay"

    # -- plumbing ---------------------------------------------------------------------

    def _start(self, parts: Sequence[Any] | None, per_rank: bool,
               apply: Callable[[list[bytes]], None], result: Any = None) -> RelayWork:
        work = RelayWork(result)
        mine = (bytes(parts[self._rank]) if per_rank else bytes(parts[0])) if parts else b""
        with self._lock:
            if self._failed is not None:
                work._finish(RelayError(str(self._failed)))
                return work
            seq = self._seq
            self._seq += 1
            self._waiting[seq] = (work, apply, mine)
            self._channel.busy += 1
        frames: list[Any] = [_CONTRIB, self._group, _HEAD.pack(seq, self._rank, self._size),
                             _PER if per_rank else _ALL, *(parts if parts else [b""])]
        self._channel.send(frames)
        return work

    def _on_result(self, seq: int, blobs: list[bytes]) -> None:
        with self._lock:
            entry = self._waiting.pop(seq, None)
            if entry is not None:
                self._channel.busy -= 1
        if entry is None:
            return
        work, apply, mine = entry
        if len(blobs) != self._size - 1:
            work._finish(RelayError(f"the relay answered with {len(blobs)} parts for the "
                                    f"{self._size - 1} other ranks of the group"))
            return
        blobs.insert(self._rank, mine)
        try:
            apply(blobs)
        except Exception as exc:  # noqa: BLE001 - handed to the waiter
            work._finish(exc)
            return
        work._finish()

    def _on_failure(self, error: BaseException) -> None:
        with self._lock:
            self._failed = error
            waiting, self._waiting = self._waiting, {}
            self._channel.busy = 0
        for work, _apply, _mine in waiting.values():
            work._finish(error)

    def abort(self) -> None:
        """Fail whatever is in flight and close the connection to the hub."""
        self._on_failure(RelayError("the process group was closed"))
        self._channel.close()

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
