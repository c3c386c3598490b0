"""A worker that shuts Horde down and initialises it again, many times, as Horovod's
own test suites do (`hvd.barrier(); hvd.shutdown()` in tearDown, `hvd.init()` next).

Each cycle runs every kind of collective, registers a process set, and checks what it
can know locally (values follow from rank, size and cycle); it records the values for
the test to compare across ranks. Results go to `$HORDE_TEST_OUT/reinit-<rank>.json`.

Environment: HORDE_TEST_OUT, REINIT_CYCLES (default 20), REINIT_NO_FINAL_SHUTDOWN (a rank
that exits after the last cycle without calling shutdown), plus tests/harness.py's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import elastic.torch as hvd
from elastic.errors import HorovodInternalError

OUT = Path(os.environ["HORDE_TEST_OUT"])
CYCLES = int(os.environ.get("REINIT_CYCLES", "20"))
NO_FINAL_SHUTDOWN = int(os.environ.get("REINIT_NO_FINAL_SHUTDOWN", "-1"))


def expect(actual: torch.Tensor, expected: Any, what: str) -> list:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected), f"{what}: {actual.tolist()} != {expected.tolist()}"
    return actual.tolist()


def collectives(cycle: int, rank: int, size: int) -> dict[str, Any]:
    """One of each collective; every result checked against what it must be."""
    out: dict[str, Any] = {}
    base = torch.arange(4, dtype=torch.float32) + cycle
    total = base * size + sum(range(size))
    out["allreduce"] = expect(hvd.allreduce(base + rank, op=hvd.Sum, name="sum"), total, "sum")
    out["average"] = expect(hvd.allreduce(base + rank, name="avg"), total / size, "average")
    handle = hvd.allreduce_async(torch.full((3,), float(rank)), op=hvd.Max, name="max")
    out["async_max"] = expect(hvd.synchronize(handle), [size - 1.0] * 3, "async max")
    grouped = hvd.grouped_allreduce([torch.ones(2) * rank, torch.ones(3) * cycle], op=hvd.Sum)
    out["grouped"] = [expect(grouped[0], [sum(range(size))] * 2, "grouped 0"),
                      expect(grouped[1], [cycle * size] * 3, "grouped 1")]
    rows = hvd.allgather(torch.full((rank + 1, 2), float(rank)))  # uneven rows per rank
    out["allgather"] = expect(rows, [[float(r)] * 2 for r in range(size) for _ in range(r + 1)],
                              "allgather")
    root = cycle % size
    out["broadcast"] = expect(hvd.broadcast(torch.tensor([float(rank), cycle]), root),
                              [float(root), cycle], "broadcast")
    sent = torch.tensor([rank * 10.0 + r for r in range(size)])
    out["alltoall"] = expect(hvd.alltoall(sent), [r * 10.0 + rank for r in range(size)],
                             "alltoall")
    scattered = hvd.reducescatter(torch.arange(size * 2, dtype=torch.float32) + cycle,
                                  op=hvd.Sum)
    out["reducescatter"] = expect(
        scattered, [(rank * 2 + i + cycle) * size for i in range(2)], "reducescatter")
    obj = hvd.broadcast_object({"cycle": cycle, "from": rank}, root_rank=root)
    assert obj == {"cycle": cycle, "from": root}, obj
    gathered = hvd.allgather_object((rank, cycle))
    assert gathered == [(r, cycle) for r in range(size)], gathered
    out["objects"] = [obj, [list(g) for g in gathered]]
    return out


def process_sets(cycle: int, rank: int, size: int, previous: hvd.ProcessSet | None,
                 static: hvd.ProcessSet | None) -> tuple[hvd.ProcessSet, dict[str, Any]]:
    """A set of the first two ranks, registered anew each cycle (given to `init()` or
    added after it); the previous cycle's set was cleared by `shutdown()`."""
    if previous is not None:
        assert previous.process_set_id is None, f"not cleared at shutdown: {previous}"
        try:
            hvd.allreduce(torch.ones(1), process_set=previous)
        except ValueError:
            pass
        else:
            raise AssertionError("a process set of the previous init still worked")
    ps = static if static is not None else hvd.add_process_set([0, 1])
    assert ps.process_set_id == 1, f"process set ids restart after init: {ps}"
    out: dict[str, Any] = {"included": ps.included()}
    if ps.included():
        out["sum"] = expect(hvd.allreduce(torch.tensor([float(rank + cycle)]), op=hvd.Sum,
                                          process_set=ps), [1.0 + 2 * cycle], "process set")
    return ps, out


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"cycles": [], "init_seconds": []}
    ps: hvd.ProcessSet | None = None
    model = torch.nn.Linear(4, 1)
    optimizer: Any = None
    stale_model = torch.nn.Linear(4, 1)
    stale: Any = None  # staleness 1: its rounds end at each shutdown() and start again

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    record.update(rank=rank, size=size, pid=os.getpid())
    ctx = hvd.runtime.context()
    world = (ctx.node_id, ctx.generation.id)

    # A rank that shuts down while the others are inside a collective: they fail at
    # once (HorovodInternalError), not at the collective timeout; then all re-initialise.
    if rank == 1:
        time.sleep(1.0)
        hvd.shutdown()
    else:
        start = time.monotonic()
        try:
            hvd.allreduce(torch.ones(1), name="abandoned")
            raise AssertionError("a collective completed without rank 1")
        except HorovodInternalError as exc:
            record["abandoned"] = {"seconds": time.monotonic() - start, "error": str(exc)}
        hvd.shutdown()

    for cycle in range(CYCLES):
        static = hvd.ProcessSet([0, 1]) if cycle % 2 else None
        start = time.monotonic()
        hvd.init(process_sets=[static] if static is not None else None)
        record["init_seconds"].append(round(time.monotonic() - start, 3))
        assert (hvd.rank(), hvd.size()) == (rank, size), (hvd.rank(), hvd.size())
        ctx = hvd.runtime.context()
        assert (ctx.node_id, ctx.generation.id) == world, "re-init changed the world"
        values = collectives(cycle, rank, size)
        ps, values["process_set"] = process_sets(cycle, rank, size, ps, static)
        # one DistributedOptimizer used across every re-init
        if optimizer is None:
            optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                                 named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        optimizer.zero_grad()
        model(torch.full((2, 4), float(rank + cycle))).sum().backward()
        optimizer.step()
        if stale is None:
            hvd.broadcast_parameters(stale_model.state_dict(), root_rank=0)
            stale = hvd.DistributedOptimizer(
                torch.optim.SGD(stale_model.parameters(), lr=0.1),
                named_parameters=stale_model.named_parameters(), staleness=1)
        for step in range(2):
            stale.zero_grad()
            stale_model(torch.full((2, 4), float(rank + cycle + step))).sum().backward()
            stale.step()
        record["cycles"].append(values)
        hvd.barrier()
        if cycle == CYCLES - 1 and rank == NO_FINAL_SHUTDOWN:
            stale.finish()  # what shutdown() would do, so that the model is final
            break  # exit without shutdown(): the process's end is what counts
        hvd.shutdown()
        assert not hvd.is_initialized()
        try:
            hvd.rank()
        except ValueError:
            pass
        else:
            raise AssertionError("hvd.rank() worked after shutdown()")
    record["params"] = [p.detach().tolist() for p in model.parameters()]
    record["stale_params"] = [p.detach().tolist() for p in stale_model.parameters()]
    record["stale_stats"] = stale.communication_stats()
    (OUT / f"reinit-{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
