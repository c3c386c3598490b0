"""Horde's side of `benchmarks/overhead.py`: a plain Horovod-style training loop.

Started by the benchmark as `horderun -np 2 python benchmarks/workers/overhead_worker.py`;
it trains the models of `overhead_common.MODELS` when the benchmark says so, exactly as a
Horovod user writes it (broadcast_parameters, DistributedOptimizer(named_parameters=...),
loss.backward(), optimizer.step()), and reports the time of each step.

With {"profile": PATH} in a run order, both ranks run instrumented steps and then the
same collectives in isolation, and rank 0 writes where the time went as JSON to PATH
(see profile_horde.py).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead_common import (  # noqa: E402
    LR,
    MODELS,
    Control,
    checksum,
    train_steps,
    without_credit_reports,
    without_negotiation,
)

import elastic.torch as hvd  # noqa: E402

#: Horde variants the benchmark can ask for (experiments, not defaults):
#: "cap1": DistributedOptimizer(bucket_cap_mb=1), a public Horde option, so that buckets
#: are launched while backward still runs; "nonego": the engine's negotiation allgather
#: replaced, in this process only, by a local table (what skipping it would save);
#: "nocredit": the per-step credit report (an allgather of sample counts plus a queued
#: report for the coordinator) patched out in this process only.
VARIANTS = ("default", "cap1", "nonego", "nocredit")


def main() -> None:
    torch.set_num_threads(1)
    hvd.init()
    control = Control("horde", hvd.rank())
    models, optimizers, initial = {}, {}, {}
    data = {name: spec.batches(hvd.rank()) for name, spec in MODELS.items()}

    def setup(name: str, variant: str) -> None:
        model = MODELS[name].build()
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        extra = {"bucket_cap_mb": 1.0} if variant == "cap1" else {}
        optimizers[name, variant] = hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), **extra)
        models[name, variant] = model
        initial[name, variant] = copy.deepcopy(model.state_dict())

    for name in MODELS:
        setup(name, "default")
    try:
        while True:
            order = control.receive()
            if order["cmd"] != "run":
                break
            name, variant = order["model"], order.get("variant", "default")
            if (name, variant) not in models:
                setup(name, variant)  # every rank gets the same order, so this is collective
            model, optimizer = models[name, variant], optimizers[name, variant]
            model.load_state_dict(initial[name, variant])  # every run starts from the same weights
            profile = order.get("profile")
            scope = {"nonego": without_negotiation, "nocredit": without_credit_reports}.get(
                variant, contextlib.nullcontext)()
            with scope:
                if profile:
                    from profile_horde import profiled_steps

                    times, cpu = profiled_steps(model, optimizer, data[name], order["warmup"],
                                                order["steps"],
                                                profile if hvd.rank() == 0 else None)
                else:
                    times, cpu = train_steps(model, optimizer, data[name], order["warmup"],
                                             order["steps"])
            control.send({"times": times, "cpu": cpu, "checksum": checksum(model),
                          "size": hvd.size()})
    finally:
        control.close()
        hvd.shutdown()


if __name__ == "__main__":
    main()
