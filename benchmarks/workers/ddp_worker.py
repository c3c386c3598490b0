"""The reference side of `benchmarks/overhead.py`: torch DistributedDataParallel on Gloo.

Started by the benchmark itself, once per rank, with RANK, WORLD_SIZE and MASTER_ADDR /
MASTER_PORT in the environment; joins a Gloo process group over `tcp://`, wraps the same
models as Horde's worker in DDP (default settings) and reports the time of each step.
Mode "local" runs the same steps under `no_sync()`: compute only, no communication.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead_common import LR, MODELS, Control, checksum, train_steps  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    control = Control("ddp", rank)
    models, optimizers, initial, data = {}, {}, {}, {}
    for name, spec in MODELS.items():
        module = spec.build()
        initial[name] = copy.deepcopy(module.state_dict())
        models[name] = DistributedDataParallel(module)
        optimizers[name] = torch.optim.SGD(models[name].parameters(), lr=LR)
        data[name] = spec.batches(rank)
    try:
        while True:
            order = control.receive()
            if order["cmd"] != "run":
                break
            name = order["model"]
            model = models[name]
            model.module.load_state_dict(initial[name])
            context = model.no_sync if order.get("mode") == "local" else None
            times, cpu = train_steps(model, optimizers[name], data[name], order["warmup"],
                                     order["steps"], context)
            control.send({"times": times, "cpu": cpu, "checksum": checksum(model.module),
                          "size": world})
    finally:
        control.close()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
