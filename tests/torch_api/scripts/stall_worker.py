"""Ranks that run different collectives (STALL_SCENARIO), for the stall-inspection tests.

batches: under DistributedOptimizer rank 1 trains one batch more than rank 0, so rank 0
reaches the metric allreduce while rank 1 waits in a gradient bucket on the direct channel.
"""

from __future__ import annotations

import os

import torch

import elastic.torch as hvd

hvd.init()
rank = hvd.rank()
scenario = os.environ["STALL_SCENARIO"]
if scenario == "batches":
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                         named_parameters=model.named_parameters())
    for _ in range(3 + rank):
        optimizer.zero_grad()
        model(torch.ones(8, 4)).sum().backward()
        optimizer.step()
    assert optimizer.communication_stats()["direct_steps"] >= 1
    hvd.allreduce(torch.tensor([1.0]), name="metric")
else:
    raise SystemExit(f"unknown STALL_SCENARIO {scenario!r}")
print(f"rank {rank} done", flush=True)
hvd.shutdown()
