"""The elastic training worker of `benchmarks/recovery.py`: records every step it completes.

    horderun --rendezvous URL --job NAME -np 3 --min-np 2 --max-np 4 \
        python benchmarks/workers/recovery_worker.py

Each process appends JSON lines to $HORDE_BENCH_OUT/<node id>.<pid>.jsonl, one per event:
- "boot": the first line of this script ran (before torch is imported);
- "imported": torch and elastic.torch are imported and the model and its torch optimizer
  are built (the first torch optimizer of a process imports torch._dynamo: about 1 s on a
  small machine), so the start-up of the process is over;
- "initialized": `hvd.init()` returned (registered, admitted, process group connected);
- "reset": the process group was rebuilt after a membership change;
- "start": the training function was (re-)entered, after the state was synchronized;
- "step": a training step completed (optimizer.step() returned).
Every line has the wall-clock time, pid, node and, once initialized, generation (with the
time the leader created it), rank and size.

The step is a small MLP on synthetic data plus a sleep of $HORDE_BENCH_STEP_TIME seconds
(default 0.05) that stands for accelerator compute; the state is committed every
$HORDE_BENCH_COMMIT_EVERY steps (default 1). With $HORDE_BENCH_OPTIMIZER_AFTER_INIT=1
the torch optimizer is built after `hvd.init()`, as most Horovod scripts do (and its
first-use import of torch._dynamo then happens after the node was admitted; "imported"
is then written before it). The worker stops by itself after
$HORDE_BENCH_MAX_SECONDS (default 900), so a lost worker cannot run forever.
"""

from __future__ import annotations

import time

BOOT = time.time()

import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import elastic.torch as hvd  # noqa: E402
from elastic.torch import runtime  # noqa: E402

OUT = os.environ["HORDE_BENCH_OUT"]
STEP_TIME = float(os.environ.get("HORDE_BENCH_STEP_TIME", "0.05"))
COMMIT_EVERY = int(os.environ.get("HORDE_BENCH_COMMIT_EVERY", "1"))
MAX_SECONDS = float(os.environ.get("HORDE_BENCH_MAX_SECONDS", "900"))
OPTIMIZER_AFTER_INIT = os.environ.get("HORDE_BENCH_OPTIMIZER_AFTER_INIT", "") == "1"
BATCH = 32


class Recorder:
    """Appends one JSON line per event; each line is flushed as it is written."""

    def __init__(self) -> None:
        node = os.environ.get("HORDE_NODE_ID", "standalone")
        self.node = node
        self._file = open(os.path.join(OUT, f"{node}.{os.getpid()}.jsonl"), "a",  # noqa: SIM115
                          buffering=1)

    def __call__(self, event: str, when: float | None = None, **fields: object) -> None:
        line: dict[str, object] = {"event": event, "time": time.time() if when is None else when,
                                   "pid": os.getpid(), "node": self.node}
        if hvd.is_initialized():
            gen = runtime.context().generation
            line.update(generation=gen.id if gen else None,
                        generation_created=gen.created_at if gen else None,
                        rank=hvd.rank(), size=hvd.size())
        line.update(fields)
        self._file.write(json.dumps(line) + "\n")


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step * 1000 + rank)
    x = torch.randn(BATCH, 64, generator=gen)
    return x, (x[:, 0] > 0).long()


def main() -> None:
    torch.set_num_threads(1)
    record = Recorder()
    record("boot", when=BOOT)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 2))
    if not OPTIMIZER_AFTER_INIT:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    record("imported")
    hvd.init()
    record("initialized")
    if OPTIMIZER_AFTER_INIT:  # the usual order of a Horovod script (lr scaled by hvd.size())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    deadline = time.monotonic() + MAX_SECONDS

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        record("start", batch=state.batch)
        while time.monotonic() < deadline:
            time.sleep(STEP_TIME)  # stands for the forward/backward compute of a real model
            x, y = batch(state.batch, hvd.rank())
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            state.batch += 1
            record("step", batch=state.batch)
            if state.batch % COMMIT_EVERY == 0:
                state.commit()

    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, batch=0)
    state.register_reset_callbacks([lambda: record("reset")])
    train(state)
    record("done")


if __name__ == "__main__":
    main()
