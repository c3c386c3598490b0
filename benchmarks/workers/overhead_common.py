"""What the two workers of `benchmarks/overhead.py` share: models, data, the control link.

Both workers (Horde's and DDP's) build the same models from the same seed, train them
on the same per-rank batches with plain SGD, and take orders from the benchmark over
one TCP connection of JSON lines, so their processes sit blocked (using no CPU) while
the other system runs:

    benchmark -> worker  {"cmd": "run", "model": NAME, "warmup": W, "steps": N, "mode": M}
    worker -> benchmark  {"times": [seconds per measured step], "checksum": float, ...}
    benchmark -> worker  {"cmd": "quit"}
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: The environment variable that tells a worker where the benchmark listens (HOST:PORT).
CONTROL_ENV = "HORDE_BENCH_CONTROL"
LR = 0.01
DATA_BATCHES = 4  # distinct batches per rank, cycled


@dataclass(frozen=True)
class ModelSpec:
    """An MLP `widths[0] -> ... -> widths[-1]` trained on batches of `batch` samples."""

    name: str
    widths: tuple[int, ...]
    batch: int

    def build(self) -> torch.nn.Module:
        torch.manual_seed(1234)
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(self.widths, self.widths[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(self.widths) - 2:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers)

    @property
    def params(self) -> int:
        return sum(a * b + b for a, b in zip(self.widths, self.widths[1:]))

    def batches(self, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(1000 + rank)
        return [(torch.randn(self.batch, self.widths[0], generator=gen),
                 torch.randint(0, self.widths[-1], (self.batch,), generator=gen))
                for _ in range(DATA_BATCHES)]


MODELS = {
    # ~0.13 M parameters (0.5 MB of gradients): per-collective overhead dominates.
    "small": ModelSpec("small", (256, 256, 256, 10), 32),
    # ~6.3 M parameters (25 MB of gradients): moving the gradients dominates.
    "large": ModelSpec("large", (1024, 2048, 2048, 10), 64),
}


def checksum(model: torch.nn.Module) -> float:
    """A float64 sum of every parameter: equal models give (nearly) equal sums."""
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                data: list[tuple[torch.Tensor, torch.Tensor]], warmup: int, steps: int,
                context: Callable[[], object] | None = None) -> tuple[list[float], float]:
    """Run `warmup + steps` SGD steps.

    Returns the wall time of each measured step and the CPU time this process (all its
    threads) used per measured step, both in seconds.
    """
    times: list[float] = []
    cpu_start = 0.0
    for i in range(warmup + steps):
        x, y = data[i % len(data)]
        if i == warmup:
            cpu_start = time.process_time()
        start = time.perf_counter()
        optimizer.zero_grad()
        if context is None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        else:
            with context():  # type: ignore[attr-defined]
                loss = F.cross_entropy(model(x), y)
                loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, (time.process_time() - cpu_start) / max(steps, 1)


class Control:
    """The worker's end of the link to the benchmark."""

    def __init__(self, system: str, rank: int) -> None:
        host, port = os.environ[CONTROL_ENV].rsplit(":", 1)
        self._sock = socket.create_connection((host, int(port)), timeout=30)
        self._sock.settimeout(None)
        self._file = self._sock.makefile("rwb")
        self.send({"hello": system, "rank": rank, "pid": os.getpid()})

    def send(self, message: dict) -> None:
        self._file.write((json.dumps(message) + "\n").encode())
        self._file.flush()

    def receive(self) -> dict:
        line = self._file.readline()
        if not line:
            return {"cmd": "quit"}  # the benchmark went away
        return json.loads(line)

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@contextlib.contextmanager
def without_negotiation() -> Iterator[None]:
    """An experiment: Horde's engine with its negotiation allgather replaced by a local table.

    Patches `CollectiveEngine._negotiate` in this process only, while the block runs;
    every rank must do the same, or collectives pair up wrongly.
    """
    from elastic.core.engine import CollectiveEngine

    original = CollectiveEngine._negotiate
    CollectiveEngine._negotiate = (  # type: ignore[method-assign]
        lambda self, transport, meta: [list(meta) for _ in range(transport.size)])
    try:
        yield
    finally:
        CollectiveEngine._negotiate = original  # type: ignore[method-assign]


@contextlib.contextmanager
def without_credit_reports() -> Iterator[None]:
    """An experiment: dense steps without the per-step credit report.

    Since the coordinator commit, `DistributedOptimizer.step()` calls
    `report_synchronous_step`, which allgathers every member's sample count (one more
    collective per step) and queues a report for the coordinator. Patched out in this
    process only, while the block runs; every rank must do the same.
    """
    from elastic.torch import optimizer

    original = getattr(optimizer, "report_synchronous_step", None)
    if original is None:  # a tree without credit reports: nothing to take out
        yield
        return
    optimizer.report_synchronous_step = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        yield
    finally:
        optimizer.report_synchronous_step = original  # type: ignore[assignment]
