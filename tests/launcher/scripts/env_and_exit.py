"""Prints the Horovod environment it got, allreduces once, exits with $EXIT_RANK_<rank>."""

from __future__ import annotations

import os
import sys

import torch

import elastic.torch as hvd

hvd.init()
keys = ["HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE",
        "HOROVOD_CROSS_RANK", "HOROVOD_CROSS_SIZE", "HOROVOD_HOSTNAME"]
print("env " + " ".join(f"{k}={os.environ.get(k)}" for k in keys), flush=True)
print(f"api rank={hvd.rank()} size={hvd.size()} local_rank={hvd.local_rank()}", flush=True)
total = hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum).item()
print(f"sum={total:g}", flush=True)
if os.environ.get("MISMATCH"):
    hvd.allreduce(torch.ones(3 + hvd.rank()))
if os.environ.get("SLEEP"):
    with open(os.path.join(os.environ["PID_DIR"], f"{os.getpid()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    import time
    time.sleep(float(os.environ["SLEEP"]))
sys.exit(int(os.environ.get(f"EXIT_RANK_{hvd.rank()}", "0")))
