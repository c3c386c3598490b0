"""A worker of the allgather-size test: the last rank plays a member whose client was
modified to announce sizes it never sends, where a tensor allgather (or alltoall)
exchanges them: 2^40 rows, or a negative count.

Every scenario runs on every rank in the same order, so the collectives pair up. Each
rank records what each scenario raised, whether collectives still line up after, the
result of an ordinary uneven allgather, and its peak memory. Results go to
$OUT/rank<r>.json.

Environment: OUT (results folder).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

import elastic.torch as hvd
from elastic.core.engine import _F_DIM0, _F_NUMEL, _F_SHAPE, CollectiveEngine, Kind

OUT = Path(os.environ["OUT"])
HUGE = 2 ** 40


def announce_rows(rows: int) -> None:
    """Make this process's next allgather announce `rows` as its first dimension in the
    negotiation (what a modified client can put on the wire), whatever it really holds."""
    original = CollectiveEngine._describe

    def once(self: CollectiveEngine, request: Any, round_no: int, join_round: int
             ) -> list[int]:
        meta = original(self, request, round_no, join_round)
        if request.kind == Kind.ALLGATHER:
            CollectiveEngine._describe = original  # type: ignore[method-assign]
            meta[_F_DIM0] = meta[_F_SHAPE] = rows
            meta[_F_NUMEL] = rows * 4
        return meta
    CollectiveEngine._describe = once  # type: ignore[method-assign]


def announce_ints(values: list[int]) -> None:
    """Make this process's next size exchange (grouped allgather, alltoall splits) carry
    `values` instead of its real sizes."""
    original = CollectiveEngine._exchange_ints

    def once(self: CollectiveEngine, transport: Any, real: list[int]) -> list[list[int]]:
        CollectiveEngine._exchange_ints = original  # type: ignore[method-assign]
        return original(self, transport, list(values))
    CollectiveEngine._exchange_ints = once  # type: ignore[method-assign]


def outcome(fn: Any) -> dict[str, Any]:
    try:
        value = fn()
        return {"raised": None, "value": value if isinstance(value, list) else repr(value)[:200]}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return {"raised": type(exc).__name__, "message": str(exc),
                "trace": traceback.format_exc()[-2000:]}


def topk_steps(rank: int, attacker: int) -> dict[str, Any]:
    """Four synchronous top-k steps; at the second, the attacker's message holds a header
    that no decoder accepts (its magic flipped), the bytes it announced all the same."""
    import hashlib

    import elastic.codecs.exchange as exchange

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 4)
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
        compression=hvd.Compression.topk(0.1, min_sparse_numel=16))
    generator = torch.Generator().manual_seed(rank)
    real_pack = exchange.pack_payloads
    step_error = None
    for step in range(4):
        if rank == attacker and step == 1:
            def corrupt_once(payloads: Any) -> torch.Tensor:
                exchange.pack_payloads = real_pack
                message = real_pack(payloads).clone()
                message[0] ^= 0xFF
                return message
            exchange.pack_payloads = corrupt_once
        optimizer.zero_grad()
        model(torch.randn(8, 64, generator=generator)).pow(2).mean().backward()
        try:
            optimizer.step()
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            step_error = f"{type(exc).__name__}: {exc}"
            break
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()[:16]
    stats = optimizer.communication_stats()
    return {"error": step_error, "params": digest, "rejected": stats.get("rejected"),
            "rounds": stats.get("rounds")}


def main() -> int:
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    attacker = size - 1
    results: dict[str, Any] = {}
    part = torch.ones(2, 4)  # 2 rows of 16 bytes on every rank

    if rank == attacker:
        announce_rows(HUGE)
    results["huge_rows"] = outcome(lambda: hvd.allgather(part, name="huge_rows"))
    if rank == attacker:
        announce_rows(-3)
    results["negative_rows"] = outcome(lambda: hvd.allgather(part, name="negative_rows"))
    if rank == attacker:
        announce_ints([HUGE])
    results["grouped"] = outcome(lambda: hvd.grouped_allgather([part, part[:1]],
                                                               name="grouped"))
    if rank == attacker:  # announces it sends 2^40 rows to rank 0
        announce_ints([HUGE] + [1] * (size - 1))
    results["alltoall"] = outcome(lambda: hvd.alltoall(torch.ones(size, 4),
                                                       splits=[1] * size, name="alltoall"))
    results["topk"] = topk_steps(rank, attacker)
    # the job goes on: collectives still line up after the refusals
    results["after"] = float(hvd.allreduce(torch.ones(1), op=hvd.Sum, name="after").item())
    # an ordinary uneven allgather (rank r sends r + 1 rows of value r) still works
    def uneven() -> list[Any]:
        gathered = hvd.allgather(torch.full((rank + 1, 3), float(rank)), name="uneven")
        return [list(gathered.shape), gathered[:, 0].tolist()]
    results["uneven"] = outcome(uneven)
    results["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    path = OUT / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(results, indent=1))
    path.with_suffix(".tmp").replace(path)
    hvd.barrier()
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
