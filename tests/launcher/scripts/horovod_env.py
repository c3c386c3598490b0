"""Prints what Horovod's variables did: the DistributedOptimizer's buckets, and how long
rank 0's allreduce waited for a rank 1 that never sends it (the collective timeout)."""

from __future__ import annotations

import time

import torch

import elastic.torch as hvd
from elastic.errors import HorovodInternalError

hvd.init()
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))  # 4 x 16 KB
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters())
print(f"buckets={len(optimizer._buckets)}", flush=True)
if hvd.rank() == 0:
    started = time.monotonic()
    try:
        hvd.allreduce(torch.ones(1), name="never")
    except HorovodInternalError as exc:
        print(f"timed out after {time.monotonic() - started:.1f} s: {exc}", flush=True)
else:
    time.sleep(10)
