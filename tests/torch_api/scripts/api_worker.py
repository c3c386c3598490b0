"""One worker of the `elastic.torch` API suite: runs many checks in sequence, in one process.

Every rank runs the same checks in the same order, so the collectives pair up. Each check
asserts what it can know locally (the expected values follow from rank and size) and
returns values for the test to compare across ranks. Results are written, after every
check, to `$HORDE_TEST_OUT/result-<rank>.json`.

Environment: HORDE_TEST_OUT (results folder), HORDE_TEST_SUITE (`two` or `three`),
plus the `HORDE_*` variables from tests/harness.py.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import torch
import torch.nn.functional as F

import elastic.torch as hvd
from elastic.errors import CollectiveMismatchError, ObjectNotAllowedError

OUT = Path(os.environ["HORDE_TEST_OUT"])
SUITE = os.environ.get("HORDE_TEST_SUITE", "two")
PROMPT = 5.0  # seconds within which a misuse must fail

CHECKS: list[tuple[str, Callable[[], Any]]] = []
RESULTS: dict[str, Any] = {}


def check(fn: Callable[[], Any]) -> Callable[[], Any]:
    CHECKS.append((fn.__name__, fn))
    return fn


def close(actual: torch.Tensor, expected: Any, what: str, atol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype) if not isinstance(
        expected, torch.Tensor) else expected
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != " \
        f"{tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.dtype.is_floating_point:
        ok = torch.allclose(actual.double(), expected.double(), atol=atol, rtol=1e-5)
    else:
        ok = torch.equal(actual, expected)
    if not ok and actual.numel() > 8:
        diff = (actual.double() - expected.double()).abs()
        at = int(diff.reshape(-1).argmax())
        raise AssertionError(f"{what}: max difference {float(diff.max()):.3g} at flat index "
                             f"{at}: got {actual.reshape(-1)[at].item()} expected "
                             f"{expected.reshape(-1)[at].item()}")
    assert ok, f"{what}: got {actual.tolist()} expected {expected.tolist()}"


def raises(kind: type[BaseException], fn: Callable[[], Any], what: str) -> str:
    """Run fn, which must raise `kind` within PROMPT seconds; return the message."""
    start = time.monotonic()
    try:
        fn()
    except kind as exc:
        elapsed = time.monotonic() - start
        assert elapsed < PROMPT, f"{what}: raised only after {elapsed:.1f} s"
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"{what}: did not raise {kind.__name__}")


def write_results() -> None:
    path = OUT / f"result-{hvd.rank()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(RESULTS, indent=1, default=str))
    tmp.replace(path)


def flat(model: torch.nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


R = N = 0  # rank and size, set after init


def ranks_values(fn: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
    return [fn(r) for r in range(N)]


# -- before init -----------------------------------------------------------------------

def before_init() -> dict[str, str]:
    out = {}
    out["rank"] = raises(ValueError, hvd.rank, "rank() before init")
    out["allreduce"] = raises(ValueError, lambda: hvd.allreduce(torch.ones(2)), "allreduce")
    out["broadcast_object"] = raises(ValueError, lambda: hvd.broadcast_object(1), "bcast obj")
    sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # slow the first time
    out["optimizer"] = raises(ValueError, lambda: hvd.DistributedOptimizer(sgd),
                              "DistributedOptimizer")
    return out


# -- collectives -----------------------------------------------------------------------

@check
def allreduce_ops() -> None:
    def mine(r: int) -> torch.Tensor:
        return torch.tensor([r + 1.0, 2.0 * (r + 1), -(r + 1.0), 0.5 + r])

    values = torch.stack(ranks_values(mine))
    t = mine(R)
    close(hvd.allreduce(t, op=hvd.Sum), values.sum(0), "Sum")
    close(hvd.allreduce(t), values.mean(0), "Average (default)")
    close(hvd.allreduce(t, op=hvd.Average), values.mean(0), "Average")
    close(hvd.allreduce(t, op=hvd.Min), values.min(0).values, "Min")
    close(hvd.allreduce(t, op=hvd.Max), values.max(0).values, "Max")
    close(hvd.allreduce(t, op=hvd.Product), values.prod(0), "Product")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        close(hvd.allreduce(t, average=False), values.sum(0), "average=False")
    close(hvd.allreduce(t, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.25),
          values.sum(0) * 0.5, "Sum with prescale and postscale")
    close(hvd.allreduce(t, op=hvd.Average, prescale_factor=3.0), values.mean(0) * 3,
          "Average with prescale")
    close(t, mine(R), "input left unchanged")
    # integer dtypes
    ints = torch.tensor([R + 1, 10 * (R + 1), 7], dtype=torch.int32)
    all_ints = torch.stack([torch.tensor([r + 1, 10 * (r + 1), 7], dtype=torch.int32)
                            for r in range(N)])
    close(hvd.allreduce(ints, op=hvd.Sum), all_ints.sum(0).int(), "int32 Sum")
    close(hvd.allreduce(ints.long(), op=hvd.Max), all_ints.max(0).values.long(), "int64 Max")
    close(hvd.allreduce(ints.long(), op=hvd.Average),
          torch.div(all_ints.sum(0), N, rounding_mode="trunc").long(), "int64 Average")
    close(hvd.allreduce(torch.tensor([R + 2], dtype=torch.uint8), op=hvd.Min),
          torch.tensor([2], dtype=torch.uint8), "uint8 Min")
    # fp16 compression: the result comes back in the input dtype
    half = hvd.allreduce(t, op=hvd.Sum, compression=hvd.Compression.fp16)
    assert half.dtype == torch.float32, half.dtype
    close(half, values.sum(0), "fp16 compression", atol=1e-2)
    close(hvd.allreduce(t.half(), op=hvd.Sum), values.sum(0).half(), "float16 tensor", atol=1e-2)
    close(hvd.allreduce(t.double(), op=hvd.Sum), values.sum(0).double(), "float64")


@check
def allreduce_inplace_and_async() -> None:
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    expected = sum(base * (r + 1) for r in range(N))
    t = base * (R + 1)
    out = hvd.allreduce_(t, op=hvd.Sum)
    assert out is t, "allreduce_ returns its input"
    close(t, expected, "allreduce_ in place")
    t = base * (R + 1)
    handle = hvd.allreduce_async(t, op=hvd.Sum, name="async.out")
    deadline = time.monotonic() + 10
    while not hvd.poll(handle):
        assert time.monotonic() < deadline, "poll never became true"
        time.sleep(0.001)
    close(hvd.synchronize(handle), expected, "allreduce_async")
    close(t, base * (R + 1), "allreduce_async leaves the input")
    raises(ValueError, lambda: hvd.synchronize(handle), "synchronize twice")
    t = base * (R + 1)
    handle = hvd.allreduce_async_(t, op=hvd.Sum, name="async.inplace")
    result = hvd.synchronize(handle)
    assert result is t
    close(t, expected, "allreduce_async_")
    # several handles in flight at once, completed out of order
    handles = [hvd.allreduce_async(torch.full((3,), float(R + i)), op=hvd.Sum, name=f"many.{i}")
               for i in range(5)]
    for i in reversed(range(5)):
        close(hvd.synchronize(handles[i]), torch.full((3,), float(sum(range(N)) + N * i)),
              f"handle {i}")


@check
def grouped_allreduce() -> None:
    a = torch.full((2, 2), float(R + 1))
    b = torch.arange(3, dtype=torch.float64) * (R + 1)
    c = torch.tensor([R + 1], dtype=torch.int64)
    total = N * (N + 1) // 2
    out = hvd.grouped_allreduce([a, b, c], op=hvd.Sum)
    close(out[0], torch.full((2, 2), float(total)), "grouped a")
    close(out[1], torch.arange(3, dtype=torch.float64) * total, "grouped b (float64)")
    close(out[2], torch.tensor([total]), "grouped c (int64)")
    avg = hvd.grouped_allreduce([a, b])
    close(avg[0], torch.full((2, 2), total / N), "grouped Average")
    hvd.grouped_allreduce_([a, b], op=hvd.Sum)
    close(a, torch.full((2, 2), float(total)), "grouped_allreduce_ a")
    handle = hvd.grouped_allreduce_async([torch.ones(2) * R, torch.ones(1)], op=hvd.Max)
    res = hvd.synchronize(handle)
    close(res[0], torch.ones(2) * (N - 1), "grouped async Max")


@check
def allgather() -> dict[str, Any]:
    t = torch.full((R + 1, 3), float(R))
    out = hvd.allgather(t)
    expected = torch.cat([torch.full((r + 1, 3), float(r)) for r in range(N)])
    close(out, expected, "allgather with different first dims")
    ints = hvd.allgather(torch.tensor([R * 10, R * 10 + 1]))
    close(ints, torch.tensor([v for r in range(N) for v in (r * 10, r * 10 + 1)]), "int64")
    h = hvd.allgather_async(torch.tensor([[R]], dtype=torch.int32), name="ag.async")
    close(hvd.synchronize(h), torch.arange(N, dtype=torch.int32).reshape(N, 1), "async")
    x = torch.full((R + 2,), float(R))
    y = torch.full((1, 2, 2), R + 0.5, dtype=torch.float64)
    gx, gy = hvd.grouped_allgather([x, y])
    close(gx, torch.cat([torch.full((r + 2,), float(r)) for r in range(N)]), "grouped x")
    close(gy, torch.cat([torch.full((1, 2, 2), r + 0.5, dtype=torch.float64)
                         for r in range(N)]), "grouped y")
    empty = hvd.allgather(torch.zeros((0 if R == 0 else 2, 2)))
    assert empty.shape == (2 * (N - 1), 2), empty.shape
    return {"shape": list(out.shape)}


@check
def broadcast() -> None:
    for root in (0, N - 1):
        t = torch.tensor([R + 1.0, R * 2.0])
        out = hvd.broadcast(t, root_rank=root)
        close(out, torch.tensor([root + 1.0, root * 2.0]), f"broadcast root {root}")
        close(t, torch.tensor([R + 1.0, R * 2.0]), "broadcast leaves input")
        t2 = torch.full((2, 3), R, dtype=torch.int64)
        assert hvd.broadcast_(t2, root_rank=root) is t2
        close(t2, torch.full((2, 3), root, dtype=torch.int64), "broadcast_ in place")
    t3 = torch.full((4,), float(R))
    handle = hvd.broadcast_async_(t3, root_rank=N - 1, name="bcast.async")
    hvd.synchronize(handle)
    close(t3, torch.full((4,), float(N - 1)), "broadcast_async_")
    handle = hvd.broadcast_async(torch.full((4,), float(R)), root_rank=0)
    close(hvd.synchronize(handle), torch.zeros(4), "broadcast_async")


@check
def alltoall() -> None:
    # without splits: rows [2j, 2j+1] go to rank j
    t = torch.stack([torch.tensor([100.0 * R + i, -1.0]) for i in range(2 * N)])
    out = hvd.alltoall(t)
    expected = torch.stack([torch.tensor([100.0 * r + i, -1.0]) for r in range(N)
                            for i in (2 * R, 2 * R + 1)])
    close(out, expected, "alltoall without splits")
    # with splits: rank r sends r + j + 1 rows to rank j
    splits = [R + j + 1 for j in range(N)]
    rows = []
    for j, count in enumerate(splits):
        rows += [[R * 1000 + j * 10 + k] for k in range(count)]
    t = torch.tensor(rows, dtype=torch.int64)
    out, received = hvd.alltoall(t, splits=splits)
    expected = torch.tensor([[r * 1000 + R * 10 + k] for r in range(N) for k in range(r + R + 1)])
    close(out, expected, "alltoall with splits")
    close(received, torch.tensor([r + R + 1 for r in range(N)], dtype=received.dtype),
          "received splits")
    out2, recv2 = hvd.alltoall(t, splits=torch.tensor(splits))
    close(out2, expected, "alltoall with tensor splits")
    handle = hvd.alltoall_async(torch.arange(N, dtype=torch.float32) + 10 * R)
    got = hvd.synchronize(handle)
    got = got[0] if isinstance(got, tuple) else got
    close(got, torch.tensor([10.0 * r + R for r in range(N)]), "alltoall_async")
    raises(ValueError, lambda: hvd.alltoall(t, splits=[1] * (N + 1)), "wrong number of splits")


@check
def reducescatter() -> None:
    rows = 2 * N + 1  # uneven: the first rank gets the extra row
    base = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2)
    t = base * (R + 1)
    counts = [rows // N + (1 if r < rows % N else 0) for r in range(N)]
    start = sum(counts[:R])
    mine = slice(start, start + counts[R])
    total = N * (N + 1) / 2
    out = hvd.reducescatter(t, op=hvd.Sum)
    close(out, base[mine] * total, "reducescatter Sum (uneven rows)")
    out = hvd.reducescatter(t)
    close(out, base[mine] * total / N, "reducescatter Average (default)")
    out = hvd.reducescatter(t, op=hvd.Max)
    close(out, base[mine] * N, "reducescatter Max")
    out = hvd.reducescatter(t, op=hvd.Sum, prescale_factor=2.0)
    close(out, base[mine] * total * 2, "reducescatter prescale")
    even = torch.ones(2 * N, 3, dtype=torch.int64) * (R + 1)
    a, b = hvd.grouped_reducescatter([t, even], op=hvd.Sum)
    close(a, base[mine] * total, "grouped a")
    close(b, torch.ones(2, 3, dtype=torch.int64) * int(total), "grouped b")
    handle = hvd.reducescatter_async(even.float(), op=hvd.Sum)
    close(hvd.synchronize(handle), torch.ones(2, 3) * total, "reducescatter_async")


@check
def barrier() -> dict[str, float]:
    if R == 0:
        time.sleep(0.6)
    start = time.monotonic()
    hvd.barrier()
    waited = time.monotonic() - start
    if R != 0:
        assert waited > 0.3, f"barrier returned after {waited:.3f} s, before rank 0 arrived"
    return {"waited": waited}


@check
def join_uneven() -> dict[str, Any]:
    batches = 2 + 2 * R  # the last rank has the most batches
    sums = []
    for i in range(batches):
        active = [r for r in range(N) if i < 2 + 2 * r]
        out = hvd.allreduce(torch.tensor([float(R + 1), 1.0]), op=hvd.Sum, name=f"join.{i}")
        close(out, torch.tensor([float(sum(r + 1 for r in active)), float(len(active))]),
              f"allreduce {i} while ranks joined")
        gathered = hvd.allgather(torch.tensor([R]), name=f"join.gather.{i}")
        close(gathered, torch.tensor(active), f"allgather {i} while ranks joined")
        sums.append(out.tolist())
    last = hvd.join()
    assert last == N - 1, f"join returned {last}, expected the last rank to join ({N - 1})"
    hvd.allreduce(torch.ones(1))  # collectives work again after everyone joined
    return {"last": last, "sums": sums}


@check
def optimizer_join_uneven() -> dict[str, Any]:
    """DistributedOptimizer with uneven steps and join(): after its first step the buckets
    go directly (no negotiation); ranks that run out of data join, and the others' steps
    average over the ranks still training, with negotiated collectives in between."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    lr = 0.01
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr),
                                   named_parameters=model.named_parameters(),
                                   bucket_cap_mb=0.0001)  # one bucket per parameter
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    reference = [p.detach().clone().double() for p in model.parameters()]
    ref_model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).double()

    def grads_of(rank: int, i: int) -> list[torch.Tensor]:
        with torch.no_grad():
            for q, value in zip(ref_model.parameters(), reference):
                q.copy_(value)
        ref_model.zero_grad()
        ref_model(torch.full((4, 8), 0.1 * (rank + 1) + 0.01 * i, dtype=torch.float64)
                  ).pow(2).sum().backward()
        return [q.grad.clone() for q in ref_model.parameters()]

    def step(i: int) -> None:
        opt.zero_grad()
        model(torch.full((4, 8), 0.1 * (R + 1) + 0.01 * i)).pow(2).sum().backward()
        opt.step()

    def expect(i: int, active: list[int]) -> None:
        per_rank = [grads_of(r, i) for r in active]
        for k, value in enumerate(reference):
            value -= lr * sum(g[k] for g in per_rank) / len(active)

    steps = [3 + 2 * r for r in range(N)]
    for i in range(steps[R]):
        step(i)
        if i % 2:
            out = hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, name=f"opt.join.metric.{i}")
            close(out, torch.tensor([float(sum(1 for r in range(N) if i < steps[r]))]),
                  f"metric allreduce {i} while ranks joined")
    last = hvd.join()
    assert last == N - 1, f"join returned {last}, expected {N - 1}"
    # A joined rank does not step (as in Horovod): take the model of the last rank.
    hvd.broadcast_parameters(model.state_dict(), root_rank=last)
    for i in range(steps[-1]):
        expect(i, [r for r in range(N) if i < steps[r]])
    for i in range(100, 104):  # everyone trains again; the channel is armed again
        step(i)
        expect(i, list(range(N)))
    for k, p in enumerate(model.parameters()):
        close(p.detach().double(), reference[k], f"parameter {k} after uneven steps",
              atol=1e-4)
    stats = opt.communication_stats()
    assert stats["direct_steps"] >= 3 and stats["negotiated_steps"] >= 2, stats
    return {"params": [p.detach().reshape(-1).tolist() for p in model.parameters()],
            "stats": stats}


@check
def optimizer_dtype_change_falls_back() -> dict[str, Any]:
    """A model cast to bfloat16 after its buckets went direct: the next steps go through
    negotiation on every rank (no hang) and still average the gradients."""
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 4)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                   named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for dtype in [torch.float32] * 3 + [torch.bfloat16] * 2:
        model.to(dtype)
        opt.zero_grad()
        model(torch.ones(2, 8, dtype=dtype) * (R + 1)).sum().backward()
        opt.step()
    expected = 2 * sum(r + 1 for r in range(N)) / N  # d(sum)/dW of a batch of 2
    close(model.weight.grad.float(), torch.full((4, 8), expected), "averaged bf16 gradient",
          atol=0.05)
    stats = opt.communication_stats()
    assert stats["direct_steps"] >= 1 and stats["negotiated_steps"] >= 3, stats
    return {"grad": model.weight.grad.float().reshape(-1).tolist(), "stats": stats}


# -- autograd --------------------------------------------------------------------------

@check
def autograd() -> None:
    weights = [float(r + 1) for r in range(N)]
    w = weights[R]
    # allreduce: y = sum_r x_r, loss_r = w_r * sum(y); the gradient is reduced with the op
    for op, scale in ((hvd.Sum, 1.0), (hvd.Average, 1.0 / N)):
        x = torch.ones(3, requires_grad=True)
        (hvd.allreduce(x, op=op) * w).sum().backward()
        close(x.grad, torch.full((3,), sum(weights) * scale), f"allreduce grad op={op}")
    x = torch.ones(3, requires_grad=True)
    ga, gb = hvd.grouped_allreduce([x, x * 2], op=hvd.Sum)
    ((ga + gb) * w).sum().backward()
    close(x.grad, torch.full((3,), 3 * sum(weights)), "grouped_allreduce grad")
    # allgather and broadcast follow Horovod: the gradient of the mean of the ranks' losses
    # (the upstream gradients are averaged over the ranks, not summed)
    x = torch.ones(R + 1, 2, requires_grad=True)
    y = hvd.allgather(x)
    coeff = torch.arange(y.shape[0], dtype=torch.float32).unsqueeze(1) * w
    (y * coeff).sum().backward()
    start = sum(r + 1 for r in range(R))
    rows = torch.arange(start, start + R + 1, dtype=torch.float32).unsqueeze(1) * \
        (sum(weights) / N)
    close(x.grad, rows.expand(R + 1, 2), "allgather grad")
    # broadcast: only the root receives the (averaged) gradient
    x = torch.ones(2, requires_grad=True)
    (hvd.broadcast(x, root_rank=0) * w).sum().backward()
    close(x.grad, torch.full((2,), sum(weights) / N if R == 0 else 0.0), "broadcast grad")
    # alltoall: rows sent to rank j get rank j's weight
    x = torch.ones(N * 2, 1, requires_grad=True)
    (hvd.alltoall(x) * w).sum().backward()
    close(x.grad, torch.tensor([[weights[j]] for j in range(N) for _ in range(2)]),
          "alltoall grad")
    splits = [j + 1 for j in range(N)]
    x = torch.ones(sum(splits), 1, requires_grad=True)
    out, _ = hvd.alltoall(x, splits=splits)
    (out * w).sum().backward()
    close(x.grad, torch.tensor([[weights[j]] for j in range(N) for _ in range(j + 1)]),
          "alltoall with splits grad")
    # reducescatter: rows of shard j get rank j's weight (divided by N for Average)
    x = torch.ones(N * 2, 2, requires_grad=True)
    (hvd.reducescatter(x, op=hvd.Sum) * w).sum().backward()
    close(x.grad, torch.tensor([[weights[j]] * 2 for j in range(N) for _ in range(2)]),
          "reducescatter Sum grad")
    x = torch.ones(N * 2, 2, requires_grad=True)
    (hvd.reducescatter(x) * w).sum().backward()
    close(x.grad, torch.tensor([[weights[j] / N] * 2 for j in range(N) for _ in range(2)]),
          "reducescatter Average grad")


# -- functions -------------------------------------------------------------------------

def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1))


@check
def broadcast_parameters() -> dict[str, Any]:
    root = N - 1
    model = small_model(100 + R)
    model(torch.randn(5, 4))  # moves BatchNorm running stats and num_batches_tracked
    hvd.broadcast_parameters(model.state_dict(), root_rank=root)
    state = {k: v.tolist() for k, v in model.state_dict().items()}
    # a list of (name, tensor) pairs, and plain tensors
    other = small_model(200 + R)
    hvd.broadcast_parameters(list(other.named_parameters()), root_rank=0)
    plain = [torch.full((2,), float(R)), torch.full((1,), R * 2.0)]
    hvd.broadcast_parameters(plain, root_rank=N - 1)
    close(plain[0], torch.full((2,), float(N - 1)), "list of tensors")
    # non-tensor values of a mapping take the root's value
    mixed = {"w": torch.full((3,), float(R)), "step": 10 + R, "tag": f"rank{R}"}
    hvd.broadcast_parameters(mixed, root_rank=0)
    assert mixed["step"] == 10 and mixed["tag"] == "rank0", mixed
    close(mixed["w"], torch.zeros(3), "tensor of a mixed dict")
    raises(ValueError, lambda: hvd.broadcast_parameters(model.parameters(), 0), "generator")
    raises(TypeError, lambda: hvd.broadcast_parameters([("x", 3)], 0), "non-tensor in list")
    # a rank whose keys differ fails on every rank, promptly
    keys = {"a": torch.zeros(1), ("b" if R == 0 else "c"): torch.zeros(1)}
    raises(CollectiveMismatchError, lambda: hvd.broadcast_parameters(keys, 0), "keys differ")
    return {"state": state, "other": flat(other)}


def adam_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    sd = opt.state_dict()
    return {"state": {str(k): {n: (v.tolist() if isinstance(v, torch.Tensor) else v)
                               for n, v in s.items()} for k, s in sd["state"].items()},
            "groups": [{k: v for k, v in g.items()} for g in sd["param_groups"]]}


@check
def broadcast_optimizer_state() -> dict[str, Any]:
    # root has trained state; the others have a fresh optimizer with other hyperparameters
    torch.manual_seed(5)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01 if R == 0 else 0.5,
                           betas=(0.9, 0.99) if R == 0 else (0.5, 0.5))
    if R == 0:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 3)).pow(2).sum().backward()
            opt.step()
    elif R == 1:
        # a partial state: only one parameter has state, and its step differs
        model(torch.randn(4, 3)).sum().backward()
        model.bias.grad = None
        opt.step()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.param_groups[0]["lr"] == 0.01 and tuple(opt.param_groups[0]["betas"]) == \
        (0.9, 0.99), opt.param_groups[0]
    assert float(opt.state[model.weight]["step"]) == 3.0
    # identical state: one more step from identical gradients keeps the ranks identical
    opt.zero_grad()
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    after = adam_state(opt)
    # SGD with momentum: the root's state is empty, so every rank ends empty
    torch.manual_seed(6)
    m2 = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.1 * (R + 1), momentum=0.9)
    if R != 0:
        m2(torch.randn(3, 2)).sum().backward()
        sgd.step()
    hvd.broadcast_optimizer_state(sgd, root_rank=0)
    assert len(sgd.state) == 0, "state should be empty like the root's"
    assert sgd.param_groups[0]["lr"] == 0.1
    # a scheduler's key in the param groups travels too
    torch.optim.lr_scheduler.StepLR(sgd, step_size=1) if R == 0 else None
    hvd.broadcast_optimizer_state(sgd, root_rank=0)
    assert sgd.param_groups[0].get("initial_lr") == 0.1, sgd.param_groups[0]
    # a rank whose optimizer has other param groups: ValueError on every rank
    groups = [{"params": [m2.weight]}, {"params": [m2.bias]}] if R == N - 1 else \
        [{"params": list(m2.parameters())}]
    odd = torch.optim.SGD(groups, lr=0.1)
    raises(ValueError, lambda: hvd.broadcast_optimizer_state(odd, root_rank=0),
           "different param groups")
    return {"adam": after, "params": flat(model)}


@check
def objects() -> dict[str, Any]:
    obj = {"rank": R, "list": [R] * (R + 1), "array": numpy.arange(R + 2.0),
           "state": torch.nn.Linear(2, 1).state_dict()}
    got = hvd.broadcast_object(obj, root_rank=N - 1)
    assert got["rank"] == N - 1 and got["list"] == [N - 1] * N, got
    assert got["array"].tolist() == list(range(N + 1)), got
    # peers are untrusted by default: code (a lambda) is refused on every rank, at once
    fn = {"fn": (lambda v: v * 2) if R == N - 1 else None}
    refused = raises(ObjectNotAllowedError, lambda: hvd.broadcast_object(fn, root_rank=N - 1),
                     "lambda broadcast")
    assert "--trusted-peers" in refused, refused
    got0 = hvd.broadcast_object(obj if R == 0 else None)
    assert got0["rank"] == 0
    gathered = hvd.allgather_object({"r": R, "pad": "x" * (R * 100)})
    assert [g["r"] for g in gathered] == list(range(N)), gathered
    assert [len(g["pad"]) for g in gathered] == [r * 100 for r in range(N)]
    raises(ValueError, lambda: hvd.broadcast_object(1, root_rank=N), "root out of range")
    refused = raises(ObjectNotAllowedError,
                     lambda: hvd.allgather_object((lambda: 1) if R == 0 else R), "lambda gather")
    assert "--trusted-peers" in refused, refused
    return {"gathered": [g["r"] for g in gathered], "refused": refused}


# -- DistributedOptimizer --------------------------------------------------------------

STEPS, LOCAL = 4, 6


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(STEPS * LOCAL * N, 5, generator=gen)
    y = x @ torch.randn(5, 1, generator=gen) + 0.1 * torch.randn(STEPS * LOCAL * N, 1,
                                                                  generator=gen)
    return x, y


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8),
                               torch.nn.Tanh(), torch.nn.Linear(8, 1))


def reference_training(opt_factory: Callable[[Any], torch.optim.Optimizer]) -> list[float]:
    """One process, global batches of N * LOCAL samples."""
    x, y = regression_data()
    model = mlp(0)
    opt = opt_factory(model.parameters())
    for step in range(STEPS):
        sl = slice(step * LOCAL * N, (step + 1) * LOCAL * N)
        opt.zero_grad()
        F.mse_loss(model(x[sl]), y[sl]).backward()
        opt.step()
    return flat(model)


def distributed_training(opt_factory: Callable[[Any], torch.optim.Optimizer],
                         passes: int = 1, **kwargs: Any) -> list[float]:
    x, y = regression_data()
    model = mlp(0 if R == 0 else 1000 + R)  # rank 0 starts as the reference does
    opt = opt_factory(model.parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   backward_passes_per_step=passes, **kwargs)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    for step in range(STEPS):
        start = step * LOCAL * N + R * LOCAL
        opt.zero_grad()
        chunk = LOCAL // passes
        for k in range(passes):
            sl = slice(start + k * chunk, start + (k + 1) * chunk)
            (F.mse_loss(model(x[sl]), y[sl]) / passes).backward()
        opt.step()
    return flat(model)


def assert_same(a: list[float], b: list[float], what: str, atol: float = 1e-5) -> None:
    ta, tb = torch.tensor(a), torch.tensor(b)
    diff = (ta - tb).abs().max().item()
    assert diff <= atol, f"{what}: max difference {diff:.3g} > {atol}"


@check
def distributed_optimizer_equivalence() -> dict[str, Any]:
    def sgd(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    def adam(params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=0.01)

    results = {}
    expected = reference_training(sgd)
    variants = {
        "default": {},
        "small_buckets": {"bucket_cap_mb": 0.0002},
        "groups_int": {"groups": 2},
        "predivide": {"gradient_predivide_factor": 2.0},
    }
    for label, kwargs in variants.items():
        got = distributed_training(sgd, **kwargs)
        assert_same(got, expected, f"SGD {label}")
        results[label] = got
    got = distributed_training(sgd, compression=hvd.Compression.fp16)
    assert_same(got, expected, "SGD fp16 compression", atol=5e-3)
    got = distributed_training(adam)
    assert_same(got, reference_training(adam), "Adam")
    results["adam"] = got
    got = distributed_training(sgd, passes=2)
    assert_same(got, expected, "backward_passes_per_step=2")
    results["passes2"] = got
    return results


@check
def distributed_optimizer_api() -> dict[str, Any]:
    model = mlp(0)
    named = list(model.named_parameters())
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = hvd.DistributedOptimizer(base, named_parameters=named)
    assert isinstance(opt, torch.optim.SGD) and type(opt).__name__ == "SGD"
    out = {}
    out["dup"] = raises(ValueError, lambda: hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        named_parameters=[("same", p) for _, p in named]), "duplicate names")
    assert "duplicates: same" in out["dup"], out["dup"]
    out["missing"] = raises(ValueError, lambda: hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named[:2]),
        "unnamed parameters")
    assert "were not named" in out["missing"], out["missing"]
    raises(ValueError, lambda: hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=[p for _, p in named]),
        "not tuples")
    raises(ValueError, lambda: hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Adasum,
        gradient_predivide_factor=2.0), "predivide with Adasum")
    raises(ValueError, lambda: hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Sum,
        gradient_predivide_factor=2.0), "predivide with Sum")
    raises(ValueError, lambda: hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), groups=[[torch.ones(1)], [1]]),
        "groups of non-tensors")

    x = torch.randn(4, 5) + R  # different data per rank
    # zero_grad between backward and step is refused
    opt.zero_grad()
    model(x).sum().backward()
    raises(AssertionError, opt.zero_grad, "zero_grad before step")
    # synchronize, clip, then step inside skip_synchronize: no warning, averaged gradients
    opt.synchronize()
    grads = [p.grad.clone() for p in model.parameters()]
    gathered = hvd.allgather_object([g.tolist() for g in grads])
    assert all(g == gathered[0] for g in gathered), "gradients differ after synchronize"
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.skip_synchronize():
            opt.step()
    # step() after synchronize() without skip_synchronize warns (and synchronizes again)
    opt.zero_grad()
    model(x).sum().backward()
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("skip_synchronize" in str(w.message) for w in caught), "no warning"
    opt.zero_grad()
    del opt  # its hooks would count the passes below too (they end with the optimizer)
    gc.collect()

    # backward_passes_per_step=2: nothing is reduced after the first pass
    acc = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   backward_passes_per_step=2)
    acc.zero_grad()
    model(x).sum().backward()
    assert acc._next_bucket == 0, "reduced after the first of two passes"
    model(x).sum().backward()
    assert acc._next_bucket == len(acc._buckets), "not reduced after the second pass"
    local = [p.grad.clone() for p in model.parameters()]
    acc.synchronize()
    expected = hvd.allreduce(torch.cat([g.reshape(-1) for g in local]))
    close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), expected,
          "accumulated then averaged", atol=1e-4)
    acc.zero_grad()
    acc.set_backward_passes_per_step(1)
    model(x).sum().backward()
    raises(AssertionError, lambda: model(x).sum().backward(), "more passes than declared")
    acc.synchronize()
    acc.zero_grad()
    del acc
    gc.collect()

    # a parameter used on some ranks only: the others contribute zeros
    torch.manual_seed(3)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    params = list(a.parameters()) + list(b.parameters())
    opt2 = hvd.DistributedOptimizer(torch.optim.SGD(params, lr=0.1),
                                    named_parameters=[("a.w", a.weight), ("a.b", a.bias),
                                                      ("b.w", b.weight), ("b.b", b.bias)],
                                    bucket_cap_mb=0.00001)
    inp = torch.ones(1, 2)
    y = a(inp)
    if R == 0:
        y = b(y)
    y.sum().backward()
    opt2.synchronize()
    assert b.weight.grad is not None
    local_b = hvd.broadcast(b.weight.grad * N, root_rank=0)  # rank 0's sum, times N / N
    close(b.weight.grad * N, local_b, "unused parameter on some ranks")
    with opt2.skip_synchronize():
        opt2.step()
    opt2.zero_grad()
    out["params_after_unused"] = flat(a) + flat(b)

    # sparse gradients: allgathered, or reduced densely with sparse_as_dense
    for as_dense in (False, True):
        torch.manual_seed(4)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        sopt = hvd.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1),
                                        named_parameters=emb.named_parameters(),
                                        sparse_as_dense=as_dense)
        idx = torch.tensor([R, R + 1, 7])
        emb(idx).sum().backward()
        sopt.synchronize()
        assert emb.weight.grad.is_sparse, "the gradient stays sparse"
        dense = emb.weight.grad.to_dense()
        expected = torch.zeros(10, 3)
        for r in range(N):
            for i in (r, r + 1, 7):
                expected[i] += 1.0 / N
        close(dense, expected, f"sparse gradient (sparse_as_dense={as_dense})")
        with sopt.skip_synchronize():
            sopt.step()
        sopt.zero_grad()
    return out


# -- SyncBatchNorm ---------------------------------------------------------------------

@check
def sync_batch_norm() -> None:
    gen = torch.Generator().manual_seed(7)
    counts = [r + 2 for r in range(N)]  # uneven local batches
    full = torch.randn(sum(counts), 3, 4, 5, generator=gen) * 3 + 1
    upstream = torch.randn(sum(counts), 3, 4, 5, generator=gen)
    start = sum(counts[:R])
    mine = slice(start, start + counts[R])

    ref = torch.nn.BatchNorm2d(3)
    sync = hvd.SyncBatchNorm(3)
    with torch.no_grad():
        for m in (ref, sync):
            m.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    xr = full.clone().requires_grad_(True)
    yr = ref(xr)
    (yr * upstream).sum().backward()
    xs = full[mine].clone().requires_grad_(True)
    ys = sync(xs)
    (ys * upstream[mine]).sum().backward()
    close(ys.detach(), yr.detach()[mine], "forward", atol=1e-4)
    close(xs.grad, xr.grad[mine], "input gradient", atol=1e-4)
    close(sync.running_mean, ref.running_mean, "running mean", atol=1e-5)
    close(sync.running_var, ref.running_var, "running var", atol=1e-4)
    assert int(sync.num_batches_tracked) == 1
    close(hvd.allreduce(sync.weight.grad, op=hvd.Sum), ref.weight.grad, "weight grad",
          atol=1e-3)
    close(hvd.allreduce(sync.bias.grad, op=hvd.Sum), ref.bias.grad, "bias grad", atol=1e-3)
    # eval mode: running statistics, no communication
    sync.eval()
    ref.eval()
    close(sync(full[mine]), ref(full[mine]), "eval forward", atol=1e-5)
    # momentum=None: cumulative average, as torch does
    ref2 = torch.nn.BatchNorm1d(3, momentum=None)
    sync2 = hvd.SyncBatchNorm(3, momentum=None)
    flat_full = full[:, :, 0, 0]
    for _ in range(2):
        ref2(flat_full)
        sync2(flat_full[mine])
    close(sync2.running_var, ref2.running_var, "cumulative running var", atol=1e-4)
    raises(ValueError, lambda: sync2(torch.ones(3)), "1-D input")
    converted = hvd.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)))
    assert isinstance(converted[1], hvd.SyncBatchNorm)


@check
def sync_batch_norm_training() -> dict[str, Any]:
    """SyncBatchNorm inside a DistributedOptimizer step: its collectives run in backward."""
    x, y = regression_data()

    def build(norm: type[torch.nn.Module]) -> torch.nn.Module:
        torch.manual_seed(11)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), norm(8), torch.nn.Tanh(),
                                   torch.nn.Linear(8, 1))

    ref = build(torch.nn.BatchNorm1d)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    model = build(hvd.SyncBatchNorm)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
                                   named_parameters=model.named_parameters(),
                                   bucket_cap_mb=0.0001)
    for step in range(STEPS):
        whole = slice(step * LOCAL * N, (step + 1) * LOCAL * N)
        ref_opt.zero_grad()
        F.mse_loss(ref(x[whole]), y[whole]).backward()
        ref_opt.step()
        mine = slice(whole.start + R * LOCAL, whole.start + (R + 1) * LOCAL)
        opt.zero_grad()
        F.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
    assert_same(flat(model), flat(ref), "parameters after training with SyncBatchNorm")
    close(model[1].running_var, ref[1].running_var, "running var after training")
    return {"params": flat(model)}


# -- misuse ----------------------------------------------------------------------------

@check
def misuse_errors() -> dict[str, str]:
    out = {}
    out["shape"] = raises(RuntimeError, lambda: hvd.allreduce(torch.ones(R + 2)), "shape")
    assert "shape" in out["shape"], out["shape"]
    out["shape_kind"] = raises(CollectiveMismatchError, lambda: hvd.allreduce(
        torch.ones(2, R + 1)), "shape (CollectiveMismatchError)")
    dtype = torch.float32 if R == 0 else torch.float64
    out["dtype"] = raises(RuntimeError, lambda: hvd.allreduce(torch.ones(2, dtype=dtype)),
                          "dtype")
    assert "type" in out["dtype"], out["dtype"]
    out["root"] = raises(RuntimeError, lambda: hvd.broadcast(torch.ones(2), root_rank=R),
                         "different roots")
    out["root_range"] = raises(ValueError, lambda: hvd.broadcast(torch.ones(2), root_rank=N),
                               "root out of range")
    raises(ValueError, lambda: hvd.broadcast_(torch.ones(2), root_rank=-1), "negative root")
    op = hvd.allreduce if R == 0 else hvd.allgather
    out["kind"] = raises(RuntimeError, lambda: op(torch.ones(2)), "different collectives")
    handle = hvd.allreduce_async(torch.ones(2), name="dup")
    out["duplicate"] = raises(ValueError, lambda: hvd.allreduce_async(torch.ones(2), name="dup"),
                              "duplicate name in flight")
    close(hvd.synchronize(handle), torch.ones(2), "the first 'dup' still completes")
    out["adasum"] = raises(ValueError, lambda: hvd.allreduce(
        torch.ones(2, dtype=torch.int32), op=hvd.Adasum), "Adasum of integers")
    out["op"] = raises(ValueError, lambda: hvd.allreduce(torch.ones(2), op=17), "unknown op")
    out["type"] = raises(TypeError, lambda: hvd.allreduce([1.0, 2.0]), "not a tensor")
    # the engine is healthy after all of this
    close(hvd.allreduce(torch.ones(2) * R, op=hvd.Sum), torch.ones(2) * sum(range(N)), "after")
    return out


# -- three ranks -----------------------------------------------------------------------

@check
def process_sets() -> dict[str, Any]:
    assert N == 3
    ps = hvd.add_process_set([0, 1])
    member = R in (0, 1)
    assert ps.size() == 2 and ps.included() == member and ps.rank() == (R if member else -1)
    if member:
        close(hvd.allreduce(torch.tensor([R + 1.0]), op=hvd.Sum, process_set=ps),
              torch.tensor([3.0]), "allreduce on [0, 1]")
        close(hvd.allgather(torch.tensor([R]), process_set=ps), torch.tensor([0, 1]),
              "allgather on [0, 1]")
        t = torch.full((2,), float(R))
        hvd.broadcast_(t, root_rank=1, process_set=ps)
        close(t, torch.ones(2), "broadcast_ on [0, 1] from set rank 1")
        assert hvd.broadcast_object(f"r{R}", root_rank=1, process_set=ps) == "r1"
        assert hvd.allgather_object(R, process_set=ps) == [0, 1]
        close(hvd.reducescatter(torch.ones(4, 1) * (R + 1), op=hvd.Sum, process_set=ps),
              torch.full((2, 1), 3.0), "reducescatter on [0, 1]")
        hvd.barrier(process_set=ps)
        raises(ValueError, lambda: hvd.broadcast(torch.ones(1), root_rank=2, process_set=ps),
               "root outside the set")
    else:
        raises(ValueError, lambda: hvd.allreduce(torch.ones(1), process_set=ps), "non-member")
    # the global set keeps working alongside
    close(hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum), torch.tensor([3.0]), "global")
    assert hvd.remove_process_set(ps) is True
    assert hvd.remove_process_set(ps) is False
    raises(ValueError, lambda: hvd.allreduce(torch.ones(1), process_set=ps), "removed set")
    return {"member": member}


CHECKS_THREE = ["allreduce_ops", "allgather", "alltoall", "reducescatter", "join_uneven",
                "optimizer_join_uneven",
                "autograd", "objects", "process_sets", "distributed_optimizer_equivalence",
                "sync_batch_norm", "sync_batch_norm_training"]


def main() -> int:
    global R, N
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        pre = before_init()
        pre_ok = True
    except BaseException:  # noqa: BLE001 - reported in the results
        pre, pre_ok = traceback.format_exc(), False
    hvd.init()
    R, N = hvd.rank(), hvd.size()
    RESULTS["_meta"] = {"rank": R, "size": N, "suite": SUITE, "pid": os.getpid()}
    RESULTS["before_init"] = {"ok": pre_ok, "value": pre}
    if SUITE == "three":
        selected = [(n, f) for n, f in CHECKS if n in CHECKS_THREE]
    else:
        selected = [(n, f) for n, f in CHECKS if n != "process_sets"]
    for name, fn in selected:
        start = time.monotonic()
        try:
            value = fn()
            RESULTS[name] = {"ok": True, "value": value}
        except BaseException:  # noqa: BLE001 - reported in the results
            RESULTS[name] = {"ok": False, "error": traceback.format_exc()}
            print(f"rank {R}: check {name} FAILED\n{RESULTS[name]['error']}", flush=True)
        RESULTS[name]["seconds"] = round(time.monotonic() - start, 3)
        write_results()
    hvd.barrier()
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
