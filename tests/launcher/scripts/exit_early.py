"""Rank 1 finishes at once; rank 0 works on for RANK0_SECONDS without collectives (as a
rank 0 that evaluates or saves a checkpoint does)."""

from __future__ import annotations

import os
import time

import torch

import elastic.torch as hvd

hvd.init()
rank = hvd.rank()
hvd.allreduce(torch.ones(1), name="step")
if rank == 0:
    time.sleep(float(os.environ["RANK0_SECONDS"]))
print(f"rank {rank} done", flush=True)
