"""Where a Horde training step spends its time (used by `overhead.py --profile`).

Wraps, in this process only, the methods of the optimizer and of the collective engine
that a step goes through, and stamps each call on the monotonic clock:

- `hook`: the autograd hooks (`_grad_ready`) on the training thread;
- `launch`: a bucket handed to the engine (`_launch`: zero-fills, compression, submit);
- `queue`: from `submit()` to the engine thread picking the request up;
- `negotiate`: the metadata allgather that precedes every collective;
- `allreduce`: the fused allreduce (`_allreduce`), split into `gloo` (waiting on the
  Gloo work) and the rest (concatenating the bucket, scaling, slicing the result);
- `finish`: `synchronize()` waiting for a bucket and copying the result into `p.grad`.

The library is not modified: the wrappers are installed on the classes of this process.
Also runs the main thread under cProfile and keeps the functions with the most own time.
"""

from __future__ import annotations

import cProfile
import functools
import io
import json
import pstats
import threading
import time
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from overhead_common import without_negotiation

from elastic.core import engine as engine_mod
from elastic.torch import optimizer as optimizer_mod

_events: list[tuple[str, float, float]] = []
_local = threading.local()


def _timed(label: str, func: Any) -> Any:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            _events.append((label, start, time.perf_counter()))
    return wrapper


def _install() -> None:
    if getattr(engine_mod.CollectiveEngine, "_bench_wrapped", False):
        return
    eng = engine_mod.CollectiveEngine
    opt = optimizer_mod._DistributedOptimizer
    opt._grad_ready = _timed("hook", opt._grad_ready)
    opt._launch = _timed("launch", opt._launch)
    opt._finish = _timed("finish", opt._finish)
    opt.synchronize = _timed("synchronize", opt.synchronize)
    eng._allreduce = _timed("allreduce", eng._allreduce)
    eng._execute = _timed("execute", eng._execute)

    original_negotiate = eng._negotiate

    @functools.wraps(original_negotiate)
    def negotiate(self: Any, *args: Any, **kwargs: Any) -> Any:
        _local.phase = "negotiate"
        start = time.perf_counter()
        try:
            return original_negotiate(self, *args, **kwargs)
        finally:
            _events.append(("negotiate", start, time.perf_counter()))
            _local.phase = None
    eng._negotiate = negotiate

    original_wait = eng._wait

    @functools.wraps(original_wait)
    def wait(self: Any, work: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_wait(self, work)
        finally:
            if getattr(_local, "phase", None) != "negotiate":
                _events.append(("gloo", start, time.perf_counter()))
    eng._wait = wait

    original_submit = eng.submit

    @functools.wraps(original_submit)
    def submit(self: Any, request: Any) -> Any:
        request._bench_submitted = time.perf_counter()
        return original_submit(self, request)
    eng.submit = submit

    original_exec = eng._execute

    @functools.wraps(original_exec)
    def execute(self: Any, request: Any) -> Any:
        submitted = getattr(request, "_bench_submitted", None)
        if submitted is not None:
            _events.append(("queue", submitted, time.perf_counter()))
        return original_exec(self, request)
    eng._execute = execute
    eng._bench_wrapped = True


def _summarise(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over steps of each phase's total time per step, in milliseconds."""
    def median(values: list[float]) -> float:
        values = sorted(values)
        return values[len(values) // 2] if values else 0.0

    keys = sorted({k for s in steps for k in s})
    return {k: round(median([s.get(k, 0.0) for s in steps]) * (1 if k.startswith("n ") else 1e3), 3)
            for k in keys}


def profiled_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   data: list[tuple[torch.Tensor, torch.Tensor]], warmup: int, steps: int,
                   path: str | None) -> tuple[list[float], float]:
    """Like `train_steps`, plus a per-step breakdown, cProfile and isolated collectives.

    Every rank must call it (the isolated collectives run on every rank); rank 0 passes
    `path` and writes the results there.
    """
    _install()
    times: list[float] = []
    per_step: list[dict[str, Any]] = []
    profiler = cProfile.Profile()
    cpu_start = 0.0
    for i in range(warmup + steps):
        x, y = data[i % len(data)]
        _events.clear()
        measured = i >= warmup
        if i == warmup:
            cpu_start = time.process_time()
        if measured:
            profiler.enable()
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.synchronize()
        t3 = time.perf_counter()
        with optimizer.skip_synchronize():
            optimizer.step()
        t4 = time.perf_counter()
        if measured:
            profiler.disable()
            times.append(t4 - t0)
            row: dict[str, Any] = defaultdict(float)
            row["step"] = t4 - t0
            row["forward"] = t1 - t0
            row["backward (incl. hooks)"] = t2 - t1
            row["synchronize after backward"] = t3 - t2
            row["sgd update"] = t4 - t3
            counts: dict[str, int] = defaultdict(int)
            for label, start, end in list(_events):
                row[f"sum {label}"] += end - start
                counts[label] += 1
            glooes = [(s, e) for lbl, s, e in _events if lbl == "gloo"]
            if glooes:
                # communication still running once backward returned: what it did not hide
                row["comm after backward"] = max(0.0, max(e for _, e in glooes) - t2)
            row["n buckets (allreduces)"] = counts.get("allreduce", 0)
            row["n negotiations"] = counts.get("negotiate", 0)
            per_step.append(row)
    cpu = (time.process_time() - cpu_start) / max(steps, 1)
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    isolated = _isolated(grads, reps=max(10, min(steps, 100)))
    if path:
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("tottime").print_stats(25)
        with open(path, "w") as handle:
            json.dump({"median_ms": _summarise(per_step), "steps": len(per_step),
                       "cpu_ms_per_step": cpu * 1e3, "isolated_ms": isolated,
                       "cprofile_main_thread": stream.getvalue()}, handle, indent=1)
    return times, cpu


def _isolated(grads: list[torch.Tensor], reps: int) -> dict[str, list[float]]:
    """[median, min] ms of the step's collectives run alone, raw on Gloo and through Horde."""
    import torch.distributed as dist

    import elastic.torch as hvd
    from elastic.core.engine import _META_LEN, Kind, Request
    from elastic.torch import runtime

    ctx = runtime.runtime()
    gloo = ctx.transport.gloo
    engine = ctx.engine
    flat = torch.cat([g.reshape(-1) for g in grads])
    meta = torch.zeros(_META_LEN, dtype=torch.int64)

    def timed(fn: Any) -> list[float]:
        """[median, min] of `reps` calls, in ms (the minimum is the cost without noise)."""
        gloo.barrier(dist.BarrierOptions()).wait()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        samples.sort()
        return [round(samples[len(samples) // 2] * 1e3, 3), round(samples[0] * 1e3, 3)]

    def raw_allreduce() -> None:
        gloo.allreduce([flat.clone()], dist.AllreduceOptions()).wait()

    def raw_allgather() -> None:
        outs = [torch.empty_like(meta) for _ in range(ctx.transport.size)]
        gloo.allgather([outs], [meta]).wait()

    request = Request(Kind.ALLREDUCE, grads, name="bench.describe")
    table = [engine._describe(request, 0, -1)] * ctx.transport.size

    def describe_check() -> None:
        engine._describe(request, 0, -1)
        engine._check(Kind.ALLREDUCE, table)

    counter = iter(range(10**9))
    buffer = torch.empty_like(flat)

    def small_no_negotiation() -> None:
        with without_negotiation():
            hvd.allreduce(torch.zeros(1), name=f"bench.n{next(counter)}")

    def copy_back() -> None:
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    return {
        "raw gloo allreduce of the flat gradients": timed(raw_allreduce),
        "raw gloo allgather of the 20-int negotiation vector": timed(raw_allgather),
        "engine _describe + _check (local, no comm)": timed(describe_check),
        "torch.cat of the gradients (one bucket copy)": timed(
            lambda: torch.cat([g.reshape(-1) for g in grads])),
        "  the same into a preallocated buffer": timed(
            lambda: torch.cat([g.reshape(-1) for g in grads], out=buffer)),
        "copy of the result back into the gradients": timed(copy_back),
        "scaling the flat gradients by 1/size (mul_)": timed(lambda: buffer.mul_(0.5)),
        "hvd.grouped_allreduce of the gradients (engine path)": timed(
            lambda: hvd.grouped_allreduce(grads, name=f"bench.g{next(counter)}")),
        "hvd.allreduce of the flat gradients (engine path)": timed(
            lambda: hvd.allreduce(flat, name=f"bench.f{next(counter)}")),
        "hvd.allreduce of a 1-element tensor (engine path)": timed(
            lambda: hvd.allreduce(torch.zeros(1), name=f"bench.s{next(counter)}")),
        "  the same with the negotiation skipped": timed(small_no_negotiation),
        "raw gloo allreduce of a 1-element tensor": timed(
            lambda: gloo.allreduce([torch.zeros(1)], dist.AllreduceOptions()).wait()),
    }
