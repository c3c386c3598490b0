"""The collective engine: executes Horovod-style requests in order on one transport.

Every request is first *negotiated*: ranks exchange a small fixed-size description
(kind, dtype, shape, op, root, name) with one allgather, so misuse (shape or dtype
mismatch, disagreeing roots) fails promptly on every rank with a clear message
instead of hanging or corrupting memory, and so ranks inside `join()` learn what
the others are doing and contribute neutral values. Requests run on a background
thread, so `*_async` calls overlap with the caller's computation. Negotiation cannot see a
rank that is elsewhere (in a direct gradient step, or in no collective): a wait that long
outlasts its peers is reported, and maybe failed, by the stall inspector (`elastic.core.stall`).
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from elastic.core import adasum
from elastic.core.gradients import GradientChannel, JoinOffer
from elastic.core.relay import RelayProcessGroup
from elastic.core.stall import StallInspector
from elastic.core.transport import Transport, wait_interruptibly
from elastic.errors import (
    AllgatherSizeError,
    CollectiveMismatchError,
    CollectiveStallError,
    HorovodInternalError,
)
from elastic.settings import DEFAULT_MAX_OBJECT_BYTES

logger = logging.getLogger(__name__)

_WAIT_SLICE = 0.05
_JOIN_POLL = datetime.timedelta(seconds=0.005)
_META_LEN = 20
_MAX_DIMS = 8


class Kind(enum.IntEnum):
    """The collective a request performs."""

    ALLREDUCE = 1
    ALLGATHER = 2
    BROADCAST = 3
    ALLTOALL = 4
    REDUCESCATTER = 5
    BARRIER = 6
    JOIN = 7

    @property
    def label(self) -> str:
        return self.name.lower()


class ReduceOp(enum.IntEnum):
    """Reduction operations, numbered as Horovod numbers them."""

    Average = 0
    Sum = 1
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5


_DIST_OPS = {
    ReduceOp.Average: dist.ReduceOp.SUM,
    ReduceOp.Sum: dist.ReduceOp.SUM,
    ReduceOp.Min: dist.ReduceOp.MIN,
    ReduceOp.Max: dist.ReduceOp.MAX,
    ReduceOp.Product: dist.ReduceOp.PRODUCT,
}

_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.bool,
]
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES, start=1)}


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code - 1]) if 0 < code <= len(_DTYPES) else f"<mixed/{code}>"


def name_hash(name: str | None) -> int:
    """A stable 62-bit hash of an op name (0 for unnamed ops)."""
    if not name:
        return 0
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 2


def _shapes_hash(tensors: Sequence[torch.Tensor], skip_dim0: bool) -> int:
    text = ";".join(
        f"{_DTYPE_CODE.get(t.dtype, 0)}:{tuple(t.shape[1:] if skip_dim0 else t.shape)}"
        for t in tensors
    )
    return name_hash(text)


@dataclass
class Request:
    """One collective call as the API layer hands it to the engine."""

    kind: Kind
    tensors: list[torch.Tensor]
    name: str | None = None
    op: ReduceOp = ReduceOp.Sum
    root: int = -1
    prescale: float = 1.0
    postscale: float = 1.0
    splits: list[int] | None = None
    """alltoall: rows sent to each rank. allgather of one tensor: set by the engine to
    the rows each rank contributed."""
    process_set_id: int = 0
    honest_part_bytes: int = 0
    """allgather, alltoall: the largest part an honest rank can send in this exchange,
    where the caller knows it (Horde's own gradient messages); the cap on what peers may
    announce is at least this, so HORDE_MAX_ALLGATHER_BYTES never refuses a large model's
    honest gradient."""
    inplace: bool = False
    """allreduce of one contiguous tensor: reduce into it instead of into a copy."""
    future: Future = field(default_factory=Future)


# Fields of the negotiation vector.
_F_KIND, _F_DTYPE, _F_OP, _F_ROOT, _F_PSET, _F_NAME, _F_NUMEL, _F_NDIM = range(8)
_F_SIG, _F_DIM0, _F_JOINED, _F_DEVICE, _F_COUNT, _F_JOIN_ROUND = range(8, 14)
_F_SHAPE = 14  # up to 6 dims follow


class CollectiveEngine:
    """Runs requests for one generation, in submission order, on a background thread."""

    def __init__(
        self,
        transport: Transport,
        interrupted: threading.Event,
        subsets: dict[int, Transport | None] | None = None,
        stall: StallInspector | None = None,
        max_part_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
    ) -> None:
        """`max_part_bytes`: the largest part a rank may announce in an allgather or
        alltoall (HORDE_MAX_ALLGATHER_BYTES); peers' announced sizes are hostile."""
        self.transport = transport
        self.max_part_bytes = max_part_bytes
        self.stall = stall
        self._current: Request | None = None
        self._members: tuple[int, ...] | None = None
        self.rank = transport.rank
        self.size = transport.size
        self.interrupted = interrupted
        self.subsets: dict[int, Transport | None] = dict(subsets or {})
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._pending_names: set[tuple[int, str]] = set()
        self._names_lock = threading.Lock()
        self._rounds = itertools.count()
        self._joined_seen = 0  # negotiated collectives so far in which some rank had joined
        self.gradients = (GradientChannel(transport.gradients, self.rank, self.size, interrupted,
                                          stall)
                          if getattr(transport, "gradients", None) is not None else None)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="horde-engine", daemon=True)
        self._thread.start()

    # -- submission -------------------------------------------------------------------

    def submit(self, request: Request) -> Future:
        """Queue a request; its future resolves to the result or the error."""
        if self._closed or self.interrupted.is_set():
            request.future.set_exception(
                HorovodInternalError("the process group of this generation is no longer valid")
            )
            return request.future
        if self.stall is not None and self.stall.error is not None:
            request.future.set_exception(CollectiveStallError(str(self.stall.error)))
            return request.future
        if request.name:
            key = (request.process_set_id, request.name)
            with self._names_lock:
                if key in self._pending_names:
                    raise ValueError(
                        f"Requested to {request.kind.label} a tensor with the same name "
                        f"{request.name!r} as another tensor that is currently being "
                        "processed. If you want to request another tensor, use a "
                        "different tensor name."
                    )
                self._pending_names.add(key)
            request.future.add_done_callback(lambda _f, k=key: self._release_name(k))
        self._queue.put(request)
        return request.future

    def _release_name(self, key: tuple[int, str]) -> None:
        with self._names_lock:
            self._pending_names.discard(key)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; requests still queued fail with HorovodInternalError.

        Joins the thread: a daemon thread still inside gloo at interpreter exit aborts
        the process ("terminate called without an active exception").
        """
        self._closed = True
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if self.stall is not None:
            self.stall.close()

    # -- the loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                break
            if self.interrupted.is_set() or self._closed:
                self._fail(request, HorovodInternalError(
                    "the process group of this generation is no longer valid"))
                continue
            try:
                self._current = request
                result = self._execute(request)
            except (CollectiveMismatchError, CollectiveStallError, ValueError, TypeError,
                    NotImplementedError) as exc:
                self._fail(request, exc)
            except HorovodInternalError as exc:
                self._fail(request, exc)
            except Exception as exc:  # noqa: BLE001 - a failed collective, for the caller
                self._fail(request, HorovodInternalError(
                    f"{request.kind.label} failed: {exc}"))
            else:
                request.future.set_result(result)
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                self._fail(request, HorovodInternalError("the collective engine was closed"))

    @staticmethod
    def _fail(request: Request, exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)

    def _wait(self, work: Any, group: Any = None) -> None:
        """Wait for a torch.distributed work, giving up when the generation ends.

        Gloo works are waited on directly in slices (a C++ wake-up); others through
        their future's callback, which needs the GIL on the backend's thread: 0.2 ms
        more per collective.
        """
        if isinstance(group, (dist.ProcessGroupGloo, RelayProcessGroup)):
            wait_interruptibly(work, self.interrupted, "a collective", self.stall,
                               self._what, members=self._members)
            return
        done = threading.Event()
        fut = work.get_future()
        fut.add_done_callback(lambda _f: done.set())
        token, started = None, time.monotonic()
        try:
            while not done.wait(_WAIT_SLICE):
                if self.interrupted.is_set():
                    raise HorovodInternalError(
                        "a collective was interrupted: the membership changed (a peer died, "
                        "hung or left)"
                    )
                if self.stall is not None:
                    if token is None:
                        token = self.stall.enter(self._what, started, members=self._members)
                    self.stall.raise_if_failed()
        finally:
            if token is not None:
                self.stall.leave(token)  # type: ignore[union-attr]
        try:
            fut.wait()
        except Exception as exc:
            raise HorovodInternalError(f"collective failed: {exc}") from exc

    def _what(self) -> str:
        """The collective this engine runs now, as a stall message names it."""
        return describe_request(self._current) if self._current is not None else "a collective"

    # -- negotiation ------------------------------------------------------------------

    def _transport_for(self, request: Request) -> Transport:
        if request.process_set_id == 0:
            return self.transport
        sub = self.subsets.get(request.process_set_id)
        if sub is None:
            raise ValueError(
                f"this rank is not a member of process set {request.process_set_id}; "
                "call collectives on a process set only from its members"
            )
        return sub

    def _describe(self, request: Request, round_no: int, join_round: int) -> list[int]:
        """This rank's negotiation vector (plain ints: a few small torch operations
        per field cost more than the allgather that carries it)."""
        meta = [-1] * _META_LEN
        tensors = request.tensors
        meta[_F_KIND] = int(request.kind)
        dtypes = {t.dtype for t in tensors}
        meta[_F_DTYPE] = _DTYPE_CODE.get(next(iter(dtypes)), 0) if len(dtypes) == 1 else 0
        meta[_F_OP] = int(request.op)
        meta[_F_ROOT] = request.root
        meta[_F_PSET] = request.process_set_id
        meta[_F_NAME] = name_hash(request.name)
        meta[_F_NUMEL] = sum(t.numel() for t in tensors)
        meta[_F_COUNT] = len(tensors)
        meta[_F_JOINED] = 1 if request.kind == Kind.JOIN else 0
        meta[_F_JOIN_ROUND] = join_round
        meta[_F_DEVICE] = 1 if any(t.is_cuda for t in tensors) else 0
        skip_dim0 = request.kind in (Kind.ALLGATHER, Kind.ALLTOALL)
        meta[_F_SIG] = _shapes_hash(tensors, skip_dim0)
        if len(tensors) == 1:
            shape = tensors[0].shape
            meta[_F_NDIM] = len(shape)
            meta[_F_DIM0] = shape[0] if len(shape) else 1
            for i, d in enumerate(list(shape)[:6]):
                meta[_F_SHAPE + i] = d
        return meta

    def _negotiate(self, transport: Transport, meta: list[int]) -> list[list[int]]:
        """Every rank's negotiation vector, by rank."""
        work, out = self._start_negotiation(transport, meta)
        self._wait(work, transport.gloo)
        return out.tolist()

    @staticmethod
    def _start_negotiation(transport: Transport, meta: list[int]) -> tuple[Any, torch.Tensor]:
        mine = torch.tensor(meta, dtype=torch.int64)
        out = torch.empty((transport.size, _META_LEN), dtype=torch.int64)
        return transport.gloo.allgather([list(out.unbind(0))], [mine]), out

    def _check(self, kind: Kind, table: list[list[int]]) -> None:
        """Raise CollectiveMismatchError naming the first field the ranks disagree on."""
        active = [row for row in table if row[_F_JOINED] == 0]
        if not active:
            return
        if any(row[_F_KIND] != active[0][_F_KIND] for row in active):
            names = ", ".join(f"rank {r}: {Kind(row[_F_KIND]).label}"
                              for r, row in enumerate(table))
            raise CollectiveMismatchError(
                f"Mismatched collective operations across ranks ({names})")

        def differs(col: int) -> bool:
            return any(row[col] != active[0][col] for row in active)

        label = kind.label
        if differs(_F_DEVICE):
            raise CollectiveMismatchError(
                f"Mismatched {label} CPU/GPU device selection: some ranks passed CUDA tensors "
                "and others CPU tensors")
        if differs(_F_DTYPE) or differs(_F_COUNT):
            types = ", ".join(
                f"rank {r}: {_dtype_name(row[_F_DTYPE])}" for r, row in enumerate(table))
            raise CollectiveMismatchError(f"Mismatched {label} data types ({types})")
        if differs(_F_OP):
            raise CollectiveMismatchError(f"Mismatched {label} reduction operations across ranks")
        if differs(_F_ROOT):
            roots = ", ".join(f"rank {r}: {row[_F_ROOT]}" for r, row in enumerate(table))
            raise CollectiveMismatchError(f"Mismatched {label} root ranks ({roots})")
        if differs(_F_SIG) or (kind not in (Kind.ALLGATHER, Kind.ALLTOALL) and differs(_F_NUMEL)):
            shapes = ", ".join(
                f"rank {r} sent {self._shape_text(row)}" for r, row in enumerate(table)
                if row[_F_JOINED] == 0)
            raise CollectiveMismatchError(f"Mismatched {label} tensor shapes: {shapes}")
        if differs(_F_NAME) and min(row[_F_NAME] for row in active) != 0:
            raise CollectiveMismatchError(
                f"Mismatched {label} tensor names across ranks: the ranks are not calling "
                "the same collective (check that every rank issues collectives in the same order)")

    @staticmethod
    def _shape_text(row: list[int]) -> str:
        ndim = row[_F_NDIM]
        if ndim < 0:
            return f"a group of {row[_F_COUNT]} tensors"
        dims = row[_F_SHAPE:_F_SHAPE + min(ndim, 6)]
        return "a tensor of shape [" + ", ".join(map(str, dims)) + ("...]" if ndim > 6 else "]")

    # -- execution --------------------------------------------------------------------

    def _execute(self, request: Request) -> Any:
        transport = self._transport_for(request)
        self._members = transport.members
        if request.kind == Kind.JOIN:
            return self._join(request, transport)
        round_no = next(self._rounds)
        table = self._negotiate(transport, self._describe(request, round_no, -1))
        self._check(request.kind, table)
        joined = [r for r, row in enumerate(table) if row[_F_JOINED] == 1]
        if joined:
            self._joined_seen += 1
        return self._perform(request, transport, table, joined)

    def _count_direct(self, collectives: int) -> None:
        """Advance the collective count by the gradient channel's direct collectives, so
        that every rank numbers collectives alike (join() reports who joined last)."""
        for _ in range(collectives):
            next(self._rounds)

    def gradient_step(self, owner: int) -> GradientStep | None:
        """One step of optimizer `owner` (a number never given to another optimizer) on
        this generation's gradient channel, or None when the transport has none.

        The step says whether its buckets go directly on the channel; what it sends is
        numbered with the engine's collectives, so the optimizer never touches the count.
        """
        if self.gradients is None:
            return None
        return GradientStep(self, self.gradients, owner)

    def _perform(
        self, request: Request, transport: Transport, table: list[list[int]], joined: list[int]
    ) -> Any:
        kind = request.kind
        if kind == Kind.ALLREDUCE and request.op == ReduceOp.Adasum:
            return self._adasum(request, transport, _first_active(table))
        if kind == Kind.ALLREDUCE:
            return self._allreduce(request, transport, len(joined))
        if kind == Kind.ALLGATHER:
            return [self._allgather(t, transport, table, i, request)
                    for i, t in enumerate(request.tensors)]
        if kind == Kind.BROADCAST:
            for t in request.tensors:
                self._broadcast(t, transport, request.root)
            return request.tensors
        if kind == Kind.ALLTOALL:
            if joined:
                raise ValueError("alltoall is not supported while some ranks have joined")
            return self._alltoall(request.tensors[0], request.splits, transport)
        if kind == Kind.REDUCESCATTER:
            if joined:
                raise ValueError("reducescatter is not supported while some ranks have joined")
            return [self._reducescatter(t, request, transport) for t in request.tensors]
        if kind == Kind.BARRIER:
            self._wait(transport.gloo.barrier(dist.BarrierOptions()), transport.gloo)
            return None
        raise ValueError(f"unknown collective kind {kind!r}")

    def _allreduce(self, request: Request, transport: Transport, joined: int) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(request.tensors):
            by_dtype.setdefault((t.dtype, t.device), []).append(i)
        results: dict[int, torch.Tensor] = {}
        contributors = transport.size - joined
        for (dtype, _device), idx in by_dtype.items():
            if len(idx) > 1:
                flat = torch.cat([request.tensors[i].detach().reshape(-1) for i in idx])
            elif request.inplace and request.tensors[idx[0]].is_contiguous():
                flat = request.tensors[idx[0]].detach().view(-1)
            else:
                flat = request.tensors[idx[0]].detach().reshape(-1).clone()
            if request.prescale != 1.0:
                _scale(flat, request.prescale)
            opts = dist.AllreduceOptions()
            opts.reduceOp = _DIST_OPS[request.op]
            group = transport.group_for(flat)
            self._wait(group.allreduce([flat], opts), group)
            factor = request.postscale
            if request.op == ReduceOp.Average:
                if dtype.is_floating_point:
                    factor = factor / contributors
                else:
                    flat = torch.div(flat, contributors, rounding_mode="trunc")
            if factor != 1.0:
                _scale(flat, factor)
            offset = 0
            for i in idx:
                n = request.tensors[i].numel()
                results[i] = flat[offset:offset + n].view(request.tensors[i].shape)
                offset += n
        outputs = [results[i] for i in range(len(request.tensors))]
        return outputs

    def _adasum(self, request: Request, transport: Transport, root: int,
                neutral_for: int = 0) -> list[torch.Tensor]:
        """Allreduce with op=Adasum (`elastic.core.adasum`): per dtype, one allgather of the
        ranks' buffers, then rank `root` computes the coefficients and broadcasts them,
        and every rank applies them. `neutral_for=T`: this rank has joined and sends
        zeros for a request of T tensors (neutral for Adasum); its result is not used.
        """
        by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(request.tensors):  # floating point (checked by the caller)
            by_dtype.setdefault((t.dtype, t.device), []).append(i)
        results: dict[int, torch.Tensor] = {}
        for idx in by_dtype.values():
            flat = torch.cat([request.tensors[i].detach().reshape(-1) for i in idx])
            if request.prescale != 1.0:
                _scale(flat, request.prescale)
            parts = [flat]
            if transport.size > 1:
                group = transport.group_for(flat)
                parts = [torch.empty_like(flat) for _ in range(transport.size)]
                self._wait(group.allgather([parts], [flat]), group)
            counts = [request.tensors[i].numel() for i in idx]
            segments = neutral_for or len(counts)
            coefficients = None
            if transport.rank != root:
                coefficients = torch.empty((transport.size - 1, segments, 2),
                                           dtype=torch.float64)
            elif not neutral_for:
                _, coefficients = adasum.reduce_parts(parts, counts)
            if transport.size > 1 and coefficients is not None:
                opts = dist.BroadcastOptions()
                opts.rootRank = root
                opts.rootTensor = 0
                self._wait(transport.gloo.broadcast([coefficients], opts), transport.gloo)
            if neutral_for:
                return []
            if transport.rank == root:
                out = parts[0]
            else:
                out, _ = adasum.reduce_parts(parts, counts, coefficients)
            if request.postscale != 1.0:
                _scale(out, request.postscale)
            offset = 0
            for i in idx:
                n = request.tensors[i].numel()
                results[i] = out[offset:offset + n].view(request.tensors[i].shape)
                offset += n
        return [results[i] for i in range(len(request.tensors))]

    def _allgather(
        self, tensor: torch.Tensor, transport: Transport, table: list[list[int]], index: int,
        request: Request,
    ) -> torch.Tensor:
        if len(request.tensors) == 1:
            dims0 = [row[_F_DIM0] if row[_F_JOINED] == 0 else 0 for row in table]
        else:
            dims0 = self._exchange_ints(transport, [tensor.shape[0]])
            dims0 = [d[0] for d in dims0]
        tensor = tensor.detach().contiguous()
        if tensor.dim() == 0:
            tensor = tensor.reshape(1)
        rest = tuple(tensor.shape[1:])
        # Before anything of their size exists (every rank sees the same sizes and rows
        # alike, so every rank refuses alike and the collectives stay in step).
        self._check_parts(describe_request(request), transport,
                          [[d] for d in dims0], _row_bytes(tensor), request.honest_part_bytes)
        if len(request.tensors) == 1:
            request.splits = list(dims0)
        group = transport.group_for(tensor)
        if len(set(dims0)) == 1:
            outs = [torch.empty_like(tensor) for _ in range(transport.size)]
            self._wait(group.allgather([outs], [tensor]), group)
            return torch.cat(outs)
        out = tensor.new_empty((sum(dims0), *rest))
        send = tensor.repeat(transport.size, *([1] * len(rest)))
        self._wait(group.alltoall_base(
            out, send, dims0, [tensor.shape[0]] * transport.size, dist.AllToAllOptions()), group)
        return out

    def _check_parts(self, what: str, transport: Transport, table: list[list[int]],
                     row_bytes: int, honest_part_bytes: int = 0) -> None:
        """Refuse (AllgatherSizeError, on every rank) rows that ranks announced, `table[r]`
        by rank r, that are negative or over `max_part_bytes` (at least
        `honest_part_bytes`; a row counts as at least one byte, so rows of nothing stay
        bounded too). Names rank, size and setting."""
        limit = max(self.max_part_bytes, honest_part_bytes)
        ranks = transport.members or range(transport.size)
        negative, over, offenders = [], [], []
        for r, announced in enumerate(table):
            rank = ranks[r] if r < len(ranks) else r
            for rows in announced:
                if rows < 0:
                    negative.append(f"rank {rank}: {rows} rows")
                elif rows * max(row_bytes, 1) > limit:
                    over.append(f"rank {rank}: {rows} rows of {row_bytes} bytes, "
                                f"{rows * row_bytes} bytes")
                else:
                    continue
                if r not in offenders:
                    offenders.append(r)
        if not negative and not over:
            return
        if negative:
            text = (f"{what}: refused a negative size ({', '.join(negative)}); nothing was "
                    "allocated. That rank runs modified or broken code")
        else:
            cap = (f"HORDE_MAX_ALLGATHER_BYTES={limit}" if limit == self.max_part_bytes else
                   f"{limit} bytes, the most an honest member sends here "
                   f"(HORDE_MAX_ALLGATHER_BYTES={self.max_part_bytes})")
            text = (f"{what}: refused a part larger than {cap} "
                    f"({', '.join(over)}); nothing was allocated. If this job really "
                    "gathers parts that large, set HORDE_MAX_ALLGATHER_BYTES higher on every "
                    "worker; otherwise that rank runs modified or broken code")
        logger.warning("%s", text)
        raise AllgatherSizeError(text, offenders)

    def _broadcast(self, tensor: torch.Tensor, transport: Transport, root: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        group = transport.group_for(tensor)
        self._wait(group.broadcast([tensor], opts), group)

    def _exchange_ints(self, transport: Transport, values: list[int]) -> list[list[int]]:
        mine = torch.tensor(values, dtype=torch.int64)
        outs = [torch.empty_like(mine) for _ in range(transport.size)]
        self._wait(transport.gloo.allgather([outs], [mine]), transport.gloo)
        return [o.tolist() for o in outs]

    def _alltoall(
        self, tensor: torch.Tensor, splits: list[int] | None, transport: Transport
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = transport.size
        tensor = tensor.detach().contiguous()
        if splits is None:
            if tensor.shape[0] % size:
                raise ValueError(
                    f"alltoall without splits needs the first dimension ({tensor.shape[0]}) "
                    f"to be divisible by the number of ranks ({size}); pass splits=")
            splits = [tensor.shape[0] // size] * size
        table = self._exchange_ints(transport, list(splits))
        self._check_parts("alltoall", transport, table, _row_bytes(tensor))
        received = [table[r][transport.rank] for r in range(size)]
        out = tensor.new_empty((sum(received), *tensor.shape[1:]))
        group = transport.group_for(tensor)
        self._wait(group.alltoall_base(
            out, tensor, received, list(splits), dist.AllToAllOptions()), group)
        return out, torch.tensor(received, dtype=torch.int32)

    def _reducescatter(
        self, tensor: torch.Tensor, request: Request, transport: Transport
    ) -> torch.Tensor:
        if request.op not in (ReduceOp.Average, ReduceOp.Sum, ReduceOp.Min, ReduceOp.Max,
                              ReduceOp.Product):
            raise NotImplementedError(f"reducescatter does not support op={request.op.name}")
        size = transport.size
        tensor = tensor.detach().contiguous()
        if tensor.dim() == 0:
            raise ValueError("reducescatter needs a tensor of at least one dimension")
        if request.prescale != 1.0:
            tensor = tensor.clone()
            _scale(tensor, request.prescale)
        rows = shard_rows(tensor.shape[0], size)
        mine = rows[transport.rank]
        out = tensor.new_empty((mine * size, *tensor.shape[1:]))
        group = transport.group_for(tensor)
        self._wait(group.alltoall_base(
            out, tensor, [mine] * size, rows, dist.AllToAllOptions()), group)
        parts = out.view(size, mine, *tensor.shape[1:])
        if request.op in (ReduceOp.Sum, ReduceOp.Average):
            result = parts.sum(dim=0, dtype=tensor.dtype)
        elif request.op == ReduceOp.Min:
            result = parts.min(dim=0).values
        elif request.op == ReduceOp.Max:
            result = parts.max(dim=0).values
        else:
            result = parts.prod(dim=0, dtype=tensor.dtype)
        factor = request.postscale
        if request.op == ReduceOp.Average:
            if tensor.dtype.is_floating_point:
                factor /= size
            else:
                result = torch.div(result, size, rounding_mode="trunc")
        if factor != 1.0:
            _scale(result, factor)
        return result

    def _join(self, request: Request, transport: Transport) -> int:
        """Contribute neutral values to the others' collectives until every rank has joined.

        While the gradient channel is on, the others may next send a direct optimizer
        step instead of a negotiated collective: a step of zero buckets is offered there
        too (see `elastic.core.gradients`).
        """
        join_round = -1
        offer = (self.gradients.offer_join()
                 if self.gradients is not None and transport is self.transport else None)
        try:
            while True:
                round_no = next(self._rounds)
                if join_round < 0:
                    join_round = round_no
                work, out = self._start_negotiation(
                    transport, self._describe(request, round_no, join_round))
                offer = self._wait_negotiation(work, transport, offer)
                table = out.tolist()
                active = [row for row in table if row[_F_JOINED] == 0]
                if not active:
                    if offer is not None:  # every rank offered it: it completes
                        self._settle(offer)
                        offer = None
                    return max(range(transport.size),
                               key=lambda r: (table[r][_F_JOIN_ROUND], r))
                self._check(Kind(active[0][_F_KIND]), table)
                self._contribute_neutral(transport, table)
        finally:
            if offer is not None and self.gradients is not None:
                self.gradients.disarm()  # failed: the generation is being left anyway

    def _wait_negotiation(self, work: Any, transport: Transport, offer: JoinOffer | None
                          ) -> JoinOffer | None:
        """Wait for a join round's negotiation; settle the offered zero step if the others
        took it meanwhile. Returns the offer while it is still open."""
        if offer is None:
            wait_interruptibly(work, self.interrupted, "join()", self.stall, _JOINING,
                               check=False)
            return None
        token = (self.stall.enter(_JOINING, time.monotonic(), check=False)
                 if self.stall is not None else None)
        try:
            while not work.is_completed():
                if offer.works[0].is_completed():
                    self._settle(offer)
                    self._wait(work, transport.gloo)
                    return None
                if self.interrupted.is_set():
                    raise HorovodInternalError(
                        "join() was interrupted: the membership changed (a peer died, hung "
                        "or left)")
                try:
                    work.wait(_JOIN_POLL)
                except RuntimeError:
                    continue
        finally:
            if token is not None:
                self.stall.leave(token)  # type: ignore[union-attr]
        self._wait(work, transport.gloo)
        return offer

    def _settle(self, offer: JoinOffer) -> None:
        assert self.gradients is not None
        self._count_direct(self.gradients.settle_join(offer))

    def _contribute_neutral(self, transport: Transport, table: list[list[int]]) -> None:
        active = next(row for row in table if row[_F_JOINED] == 0)
        kind = Kind(active[_F_KIND])
        dtype = _DTYPES[active[_F_DTYPE] - 1] if active[_F_DTYPE] > 0 else torch.float32
        joined = sum(1 for row in table if row[_F_JOINED] == 1)
        if active[_F_DEVICE] == 1:
            raise ValueError("join() with CUDA collectives is not supported yet")
        if kind == Kind.ALLREDUCE:
            if active[_F_DTYPE] <= 0:
                raise ValueError("join() does not support grouped allreduce of mixed dtypes")
            op = ReduceOp(active[_F_OP])
            flat = torch.full((active[_F_NUMEL],), _neutral(op, dtype), dtype=dtype)
            request = Request(Kind.ALLREDUCE, [flat], op=op)
            if op == ReduceOp.Adasum:
                self._adasum(request, transport, _first_active(table),
                             neutral_for=active[_F_COUNT])
            else:
                self._allreduce(request, transport, joined)
        elif kind == Kind.ALLGATHER:
            ndim = active[_F_NDIM]
            if ndim < 0:
                raise ValueError("join() does not support grouped allgather")
            rest = active[_F_SHAPE + 1:_F_SHAPE + ndim]
            empty = torch.empty((0, *rest), dtype=dtype)
            self._allgather(empty, transport, table, 0, Request(Kind.ALLGATHER, [empty]))
        elif kind == Kind.BROADCAST:
            ndim = active[_F_NDIM]
            if ndim < 0:
                raise ValueError("join() does not support grouped broadcast")
            shape = active[_F_SHAPE:_F_SHAPE + ndim]
            self._broadcast(torch.empty(shape, dtype=dtype), transport, active[_F_ROOT])
        elif kind == Kind.BARRIER:
            self._wait(transport.gloo.barrier(dist.BarrierOptions()), transport.gloo)
        else:
            raise ValueError(f"{kind.label} is not supported while some ranks have joined")


_JOINING = "hvd.join() (waiting for the other ranks to join)"


class GradientStep:
    """One optimizer step as the gradient channel sees it (`CollectiveEngine.gradient_step`).

    `direct`: the step's buckets go straight to the channel (the channel was armed for
    this optimizer by an earlier complete step); otherwise they are negotiated, and
    `complete(plan)` arms the channel for the next steps unless a rank joined meanwhile.
    """

    def __init__(self, engine: CollectiveEngine, channel: GradientChannel, owner: int) -> None:
        self._engine = engine
        self._channel = channel
        self._owner = owner
        self._joined_mark = engine._joined_seen
        self.direct = channel.serves(owner)
        self.tail = channel.tail if self.direct else 0
        """Elements a bucket's buffer holds after its gradients (the channel's tail)."""

    def start(self, flat: torch.Tensor, index: int) -> Any:
        """Start bucket `index` (gradients first, then `tail` free elements) on the channel."""
        return self._channel.start(flat, index)

    def finish(self, work: Any, flat: torch.Tensor, index: int) -> int:
        """Wait for a started bucket; returns how many ranks contributed to it."""
        count = self._channel.finish(work, flat, index)
        self._engine._count_direct(1)
        return count

    def wait(self, work: Any) -> None:
        """Wait out a started bucket whose result is not wanted (after an error)."""
        self._channel.wait(work)

    def fall_back(self) -> None:
        """This bucket cannot go direct (its dtype or device changed, alike on every rank):
        the channel is off until a complete negotiated step arms it again."""
        self._channel.disarm()

    def complete(self, plan: list[tuple[int, torch.dtype]]) -> None:
        """After a negotiated step that every rank completed: send the next steps directly
        (`plan`: numel and dtype of each bucket's buffer), unless a rank joined during it."""
        if self._engine._joined_seen == self._joined_mark:
            self._channel.arm(self._owner, plan)


def describe_request(request: Request) -> str:
    """`allreduce 'loss' (shape [1], torch.float32)`: a request as stall messages name it."""
    name = repr(request.name) if request.name else "(unnamed)"
    tensors = request.tensors
    if request.kind == Kind.BARRIER:
        detail = ""
    elif len(tensors) == 1:
        detail = f" (shape {list(tensors[0].shape)}, {tensors[0].dtype})"
    else:
        detail = f" ({len(tensors)} tensors)"
    where = f" on process set {request.process_set_id}" if request.process_set_id else ""
    return f"{request.kind.label} {name}{detail}{where}"


def shard_rows(rows: int, parts: int) -> list[int]:
    """Rows per rank for reducescatter: as even as possible, earlier ranks get the extra."""
    base, extra = divmod(rows, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def _row_bytes(tensor: torch.Tensor) -> int:
    """Bytes of one row (the first dimension's unit) of `tensor`."""
    return tensor.element_size() * math.prod(tensor.shape[1:])


def _first_active(table: list[list[int]]) -> int:
    """The lowest rank that has not joined (it computes what needs real data)."""
    return next(r for r, row in enumerate(table) if row[_F_JOINED] == 0)


def _neutral(op: ReduceOp, dtype: torch.dtype) -> float | int | bool:
    if op in (ReduceOp.Sum, ReduceOp.Average, ReduceOp.Adasum):
        return 0
    if op == ReduceOp.Product:
        return 1
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    return info.max if op == ReduceOp.Min else info.min


def _scale(tensor: torch.Tensor, factor: float) -> None:
    """Multiply in place; integer tensors are scaled in float64 and truncated, as Horovod does."""
    if tensor.dtype.is_floating_point:
        tensor.mul_(factor)
    else:
        tensor.copy_((tensor.double() * factor).to(tensor.dtype))
