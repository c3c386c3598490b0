"""A worker of the object-safety suite: one rank plays a hostile member whose client was
modified to send a pickle with a `__reduce__` (it creates a marker file where it runs).

Each scenario runs on every rank in the same order, so the collectives pair up. Honest
ranks record what they saw; the test checks that no marker file exists and that every
honest rank refused with a clear error. Results go to $OUT/rank<r>.json.

Environment: OUT (results folder), HORDE_TEST_MODE (`attack`, `common`, `trusted` or
`huge`: the attacker announces a 2^40-byte object).
"""

from __future__ import annotations

import io
import json
import os
import sys
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy
import torch

import elastic.torch as hvd
from elastic.torch import functions

OUT = Path(os.environ["OUT"])
MODE = os.environ.get("HORDE_TEST_MODE", "attack")


class Payload:
    """What the attacker sends: unpickling it runs `exec`, which creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class SystemPayload(Payload):
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def hostile_blob(payload: Payload, fmt: str) -> bytes:
    """The bytes a modified client puts on the wire (in either tagged format, or untagged
    cloudpickle as the previous wire format had)."""
    import cloudpickle

    if fmt == "restricted":
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return b"R" + buffer.getvalue()
    if fmt == "pickle":
        return b"P" + cloudpickle.dumps(payload)
    return cloudpickle.dumps(payload)


def send_hostile(blob: bytes) -> None:
    """Make this process's next object on the wire `blob`, whatever it was asked to send."""
    tensor = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    if hasattr(functions, "_encode"):
        original = functions._encode

        def once(obj: Any, safe: Any) -> Any:
            functions._encode = original
            return tensor, None
        functions._encode = once
    else:  # the old wire format (plain cloudpickle), to show the attack works there
        original = functions._dumps

        def once_old(obj: Any) -> Any:
            functions._dumps = original
            return tensor
        functions._dumps = once_old


def outcome(fn: Any) -> dict[str, Any]:
    try:
        value = fn()
        return {"raised": None, "value": repr(value)[:200]}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return {"raised": type(exc).__name__, "message": str(exc),
                "trace": traceback.format_exc()[-2000:]}


def attack(rank: int, size: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    attacker = size - 1
    scenarios = [("broadcast_exec", Payload, "restricted"),
                 ("broadcast_system", SystemPayload, "restricted"),
                 ("broadcast_full_pickle", Payload, "pickle"),
                 ("broadcast_old_format", Payload, "old")]
    for name, kind, fmt in scenarios:
        if rank == attacker:
            send_hostile(hostile_blob(kind(OUT / f"marker-{name}"), fmt))
        results[name] = outcome(lambda n=name: hvd.broadcast_object(None, root_rank=attacker,
                                                                    name=n))
    if rank == attacker:
        send_hostile(hostile_blob(Payload(OUT / "marker-allgather"), "restricted"))
    results["allgather"] = outcome(lambda: hvd.allgather_object({"rank": rank}))
    # the job goes on: collectives still line up after the refusals
    total = hvd.allreduce(torch.ones(1), op=hvd.Sum, name="after")
    results["after"] = float(total.item())
    write(rank, results)
    # the elastic state sync: rank 0 is its root, so here rank 0 is the hostile one (it
    # then waits in the next collective, which the others, having refused, never join)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    state = hvd.elastic.TorchState(model, optimizer, epoch=rank)
    if rank == 0:
        send_hostile(hostile_blob(Payload(OUT / "marker-state-sync"), "restricted"))
    results["state_sync"] = outcome(state.sync)
    write(rank, results)
    os._exit(0)  # no shutdown barrier: the hostile rank is not in step any more


def huge(rank: int, size: int) -> dict[str, Any]:
    """The attacker announces 2^40 bytes where an object's size is exchanged (a client
    modified to skip broadcast_object's own encoding) and sends nothing after it."""
    import resource

    results: dict[str, Any] = {}
    attacker = size - 1
    announced = torch.tensor([2 ** 40], dtype=torch.int64)
    if rank == attacker:
        functions.broadcast_(announced, attacker, name="huge_broadcast.sz")
    else:
        results["broadcast"] = outcome(lambda: hvd.broadcast_object(None, root_rank=attacker,
                                                                    name="huge_broadcast"))
    if rank == attacker:
        functions.allgather(announced, name="huge_allgather.sz")
    else:
        results["allgather"] = outcome(lambda: hvd.allgather_object({"rank": rank},
                                                                    name="huge_allgather"))
    # the job goes on: collectives still line up after the refusals
    results["after"] = float(hvd.allreduce(torch.ones(1), op=hvd.Sum, name="after").item())
    results["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return results


def common(rank: int, size: int) -> dict[str, Any]:
    """What scripts really broadcast travels intact, with peers untrusted."""
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    adam = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    model(torch.randn(5, 4)).sum().backward()
    adam.step()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=0.1, total_steps=10)
    obj = {"model": model.state_dict(), "adam": adam.state_dict(),
           "scheduler": scheduler.state_dict(),
           "array": numpy.arange(rank + 3, dtype=numpy.float32),
           "scalar": numpy.float64(rank), "ordered": OrderedDict(a=rank), "set": {rank, 7},
           "nested": [(rank, "x" * rank, b"b", None, 2 ** 80, 1.5, 2j)], "dtype": torch.bfloat16}
    got = hvd.broadcast_object(obj, root_rank=size - 1)
    got_repr = {k: repr(v) for k, v in got.items()}  # before the sync below changes the model
    gathered = hvd.allgather_object(obj)
    hvd.broadcast_optimizer_state(adam, root_rank=size - 1)
    state = hvd.elastic.TorchState(model, adam, epoch=rank, batch=3 * rank)
    state.sync()

    return {"got": got_repr,
            "gathered_ranks": [g["ordered"]["a"] for g in gathered],
            "gathered_arrays": [g["array"].tolist() for g in gathered],
            "adam": {k: repr(v) for k, v in adam.state_dict()["param_groups"][0].items()},
            "adam_state": [[t.tolist() for t in s.values() if isinstance(t, torch.Tensor)]
                           for s in adam.state_dict()["state"].values()],
            "epoch": state.epoch, "batch": state.batch}


def trusted(rank: int, size: int) -> dict[str, Any]:
    """With --trusted-peers, code travels (as in Horovod)."""
    class Local:
        def __init__(self, v: int) -> None:
            self.v = v
    fn = hvd.broadcast_object((lambda x: x * 10 + 1) if rank == 0 else None, root_rank=0)
    local = hvd.allgather_object(Local(rank))
    return {"fn": fn(4), "local": [item.v for item in local]}


def write(rank: int, result: dict[str, Any]) -> None:
    path = OUT / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
    path.with_suffix(".tmp").replace(path)


def main() -> int:
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    result = {"attack": attack, "common": common, "trusted": trusted,
              "huge": huge}[MODE](rank, size)
    write(rank, result)
    hvd.barrier()
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
