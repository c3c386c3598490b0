"""The worker of tests/torch_api/test_adasum_sparse.py: Adasum and sparse allreduce.

Four workers; most checks run on three groups of them: the global set (4 ranks), a
process set of 3 ranks (not a power of two) and one of 2 ranks. In each group every
member knows every member's input (it follows from the group rank), so it compares its
result with a direct formula computed locally; it also returns its results so that the
test can compare the members bit for bit. Results go to `$HORDE_TEST_OUT/result-<rank>.json`
after every check, keyed `check[group]`.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import elastic.core.adasum
import elastic.torch as hvd

OUT = Path(os.environ["HORDE_TEST_OUT"])
PROMPT = 5.0  # seconds within which a misuse must fail

CHECKS: list[tuple[str, Callable[[], Any], bool]] = []
RESULTS: dict[str, Any] = {}
GROUPS = {"np4": [0, 1, 2, 3], "np3": [0, 1, 2], "np2": [1, 3]}
R = N = 0  # this process's rank and size within the group being checked
PS: Any = None  # the group's process set


def check(fn: Callable[[], Any]) -> Callable[[], Any]:
    """A check run in every group."""
    CHECKS.append((fn.__name__, fn, True))
    return fn


def global_check(fn: Callable[[], Any]) -> Callable[[], Any]:
    """A check run once, by all four ranks."""
    CHECKS.append((fn.__name__, fn, False))
    return fn


def raises(kind: type[BaseException], fn: Callable[[], Any], what: str) -> str:
    start = time.monotonic()
    try:
        fn()
    except kind as exc:
        assert time.monotonic() - start < PROMPT, f"{what}: raised only after the deadline"
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"{what}: did not raise {kind.__name__}")


def bits(t: torch.Tensor) -> str:
    """The exact bytes of a tensor, for comparisons across ranks."""
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes().hex()


# -- the direct formula ----------------------------------------------------------------

def adasum2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Adasum of two vectors, written out (in float64), with Horovod's zero guard."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    dot, aa, bb = float(a @ b), float(a @ a), float(b @ b)
    ca = 1.0 - dot / (2.0 * aa) if aa >= 1e-8 else 1.0
    cb = 1.0 - dot / (2.0 * bb) if bb >= 1e-8 else 1.0
    return ca * a + cb * b


def adasum_tree(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Horovod's reference tree (pairs (0,1), (2,3), ..., then their results, ...); an odd
    one out at a level moves up unchanged."""
    level = [v.double().reshape(-1) for v in vectors]
    while len(level) > 1:
        nxt = [adasum2(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def expect(actual: torch.Tensor, vectors: list[torch.Tensor], what: str,
           tol: float = 1e-6) -> None:
    expected = adasum_tree(vectors).reshape(actual.shape)
    assert actual.dtype == vectors[0].dtype, f"{what}: dtype {actual.dtype}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in {actual.tolist()}"
    diff = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if actual.numel() else 0.0)
    assert diff <= tol * scale, f"{what}: got {actual.tolist()} expected {expected.tolist()}"


def rank_vector(r: int, seed: int, shape: tuple[int, ...] = (7,),
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * seed + r)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# -- Adasum allreduce ------------------------------------------------------------------

@check
def adasum_formula() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6), (torch.float16, 2e-3),
                       (torch.bfloat16, 2e-2)):
        for seed, shape in ((1, (7,)), (2, (3, 4)), (3, (1,))):
            vectors = [rank_vector(r, seed, shape, dtype) for r in range(N)]
            got = hvd.allreduce(vectors[R], op=hvd.Adasum, name=f"adasum.{dtype}.{seed}",
                                process_set=PS)
            expect(got, vectors, f"{dtype} {shape}", tol)
            out[f"{dtype}.{seed}"] = bits(got)
    # parallel vectors average, orthogonal ones add up
    v = rank_vector(0, 4)
    got = hvd.allreduce(v * 1.0, op=hvd.Adasum, process_set=PS)
    assert torch.allclose(got, v, atol=1e-12), f"identical vectors: {got} != {v}"
    basis = torch.zeros(N, dtype=torch.float64)
    basis[R] = R + 1.0
    got = hvd.allreduce(basis, op=hvd.Adasum, process_set=PS)
    assert torch.allclose(got, torch.arange(1.0, N + 1, dtype=torch.float64)), got
    # zeros: one rank, every rank
    vectors = [rank_vector(r, 5) * (0.0 if r == 1 else 1.0) for r in range(N)]
    got = hvd.allreduce(vectors[R], op=hvd.Adasum, process_set=PS)
    expect(got, vectors, "rank 1 sends zeros")
    out["one_zero"] = bits(got)
    got = hvd.allreduce(torch.zeros(5), op=hvd.Adasum, process_set=PS)
    assert torch.equal(got, torch.zeros(5)), f"all zeros gave {got}"
    tiny = torch.full((3,), 1e-5 * (R + 1), dtype=torch.float64)  # squared norm under 1e-8
    got = hvd.allreduce(tiny, op=hvd.Adasum, process_set=PS)
    expect(got, [torch.full((3,), 1e-5 * (r + 1), dtype=torch.float64) for r in range(N)],
           "norms under Horovod's floor", 1e-12)
    return out


@check
def adasum_variants() -> dict[str, Any]:
    out: dict[str, Any] = {}
    a = [rank_vector(r, 10, (4,)) for r in range(N)]
    b = [rank_vector(r, 11, (2, 3)) for r in range(N)]
    # grouped: dot products per tensor, not over the fused buffer
    ga, gb = hvd.grouped_allreduce([a[R], b[R]], op=hvd.Adasum, process_set=PS)
    expect(ga, a, "grouped, first tensor")
    expect(gb, b, "grouped, second tensor")
    fused = adasum_tree([torch.cat([x, y.reshape(-1)]) for x, y in zip(a, b)])
    assert not torch.allclose(torch.cat([ga, gb.reshape(-1)]), fused), \
        "the grouped result equals the fused-buffer Adasum: dot products are not per tensor"
    out["grouped"] = bits(ga) + bits(gb)
    # in place, async, async in place, grouped in place
    t = a[R].clone()
    hvd.allreduce_(t, op=hvd.Adasum, process_set=PS)
    expect(t, a, "allreduce_")
    got = hvd.synchronize(hvd.allreduce_async(a[R], op=hvd.Adasum, process_set=PS))
    expect(got, a, "allreduce_async")
    t = a[R].clone()
    handle = hvd.allreduce_async_(t, op=hvd.Adasum, process_set=PS)
    assert hvd.synchronize(handle) is t
    expect(t, a, "allreduce_async_")
    pair = [a[R].clone(), b[R].clone()]
    hvd.grouped_allreduce_(pair, op=hvd.Adasum, process_set=PS)
    expect(pair[0], a, "grouped_allreduce_ first")
    expect(pair[1], b, "grouped_allreduce_ second")
    # mixed dtypes in a group: one Adasum per dtype
    c = [rank_vector(r, 12, (5,), torch.float32) for r in range(N)]
    ga, gc = hvd.grouped_allreduce([a[R], c[R]], op=hvd.Adasum, process_set=PS)
    expect(ga, a, "mixed group float64")
    expect(gc, c, "mixed group float32")
    # prescale before, postscale after, as Horovod applies them
    got = hvd.allreduce(a[R], op=hvd.Adasum, prescale_factor=2.0, postscale_factor=0.25,
                        process_set=PS)
    expect(got / 0.25, [2.0 * x for x in a], "prescale and postscale", 1e-12)
    # differentiable: the gradient is Adasum of the gradients, as in Horovod
    x = a[R].clone().requires_grad_()
    hvd.allreduce(x, op=hvd.Adasum, process_set=PS).mul(float(R + 1)).sum().backward()
    expect(x.grad, [torch.full((4,), float(r + 1), dtype=torch.float64) for r in range(N)],
           "gradient")
    out["bad_dtype"] = raises(ValueError, lambda: hvd.allreduce(
        torch.ones(3, dtype=torch.int64), op=hvd.Adasum, process_set=PS), "integer Adasum")
    assert "floating-point" in out["bad_dtype"], out["bad_dtype"]
    return out


@global_check
def adasum_join() -> dict[str, Any]:
    """A joined rank contributes zeros (neutral for Adasum); also when it is rank 0, which
    otherwise computes the coefficients."""
    out = {}
    for joiner in (N - 1, 0):
        vectors = [rank_vector(r, 20 + joiner, (6,)) for r in range(N)]
        if joiner == R:
            last = hvd.join()
        else:
            got = hvd.allreduce(vectors[R], op=hvd.Adasum, name=f"join.{joiner}")
            expect(got, [v if r != joiner else torch.zeros(6, dtype=torch.float64)
                         for r, v in enumerate(vectors)], f"rank {joiner} joined")
            out[f"joined{joiner}"] = bits(got)
            last = hvd.join()
        assert last in range(N), last
    return out


@check
def adasum_bit_identical_with_uneven_rounding() -> dict[str, Any]:
    """A rank whose dot products round differently (another CPU, another GPU): every rank
    still ends with the same bits, since only one rank computes the coefficients."""
    original = elastic.core.adasum.pair_coefficients
    if R == N - 1:
        def skewed(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
            ca, cb = original(a, b)
            return ca * (1 + 1e-6), cb * (1 - 1e-6)

        elastic.core.adasum.pair_coefficients = skewed
    try:
        vectors = [rank_vector(r, 40, (64,), torch.float32) for r in range(N)]
        got = hvd.allreduce(vectors[R], op=hvd.Adasum, process_set=PS)
        expect(got, vectors, "with one skewed rank")
    finally:
        elastic.core.adasum.pair_coefficients = original
    return {"result": bits(got)}


# -- Adasum DistributedOptimizer -------------------------------------------------------

STEPS, LOCAL = 4, 6


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(STEPS * LOCAL * N, 5, generator=gen)
    y = x @ torch.randn(5, 1, generator=gen) + 0.1 * torch.randn(STEPS * LOCAL * N, 1,
                                                                  generator=gen)
    return x, y


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def rank_batch(r: int, step: int) -> slice:
    start = step * LOCAL * N + r * LOCAL
    return slice(start, start + LOCAL)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def adasum_reference() -> list[torch.Tensor]:
    """N local optimizers (each keeps its own momentum), one shared model: each step every
    rank steps from the shared parameters, and the shared parameters move by the Adasum
    of the ranks' parameter changes, parameter by parameter."""
    x, y = regression_data()
    shared = [p.detach().clone() for p in mlp(0).parameters()]
    models = [mlp(0) for _ in range(N)]
    opts = [sgd(m.parameters()) for m in models]
    for step in range(STEPS):
        deltas = []
        for r, (model, opt) in enumerate(zip(models, opts)):
            with torch.no_grad():
                for p, s in zip(model.parameters(), shared):
                    p.copy_(s)
            opt.zero_grad()
            F.mse_loss(model(x[rank_batch(r, step)]), y[rank_batch(r, step)]).backward()
            opt.step()
            deltas.append([p.detach() - s for p, s in zip(model.parameters(), shared)])
        shared = [s + adasum_tree([d[i] for d in deltas]).reshape(s.shape).float()
                  for i, s in enumerate(shared)]
    return shared


@check
def adasum_optimizer() -> dict[str, Any]:
    x, y = regression_data()
    model = mlp(0 if R == 0 else 100 + R)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0, process_set=PS)
    opt = hvd.DistributedOptimizer(sgd(model.parameters()),
                                   named_parameters=model.named_parameters(), op=hvd.Adasum,
                                   bucket_cap_mb=0.0001, process_set=PS)  # several buckets
    assert isinstance(opt, torch.optim.SGD)
    for step in range(STEPS):
        opt.zero_grad()
        F.mse_loss(model(x[rank_batch(R, step)]), y[rank_batch(R, step)]).backward()
        if step == 0:
            raises(AssertionError, opt.zero_grad, "zero_grad between backward and step")
            opt.synchronize()  # nothing to do, as in Horovod
            raises(AssertionError, opt.skip_synchronize().__enter__, "skip_synchronize")
        opt.step()
    expected = adasum_reference()
    for (name, p), e in zip(model.named_parameters(), expected):
        diff = (p.detach() - e).abs().max().item()
        assert diff < 1e-5, f"{name}: differs from the direct formula by {diff:.3g}"
    # backward_passes_per_step: one pass too many is refused
    del opt
    gc.collect()  # its hooks end with it
    acc = hvd.DistributedOptimizer(sgd(model.parameters()), op=hvd.Adasum,
                                   backward_passes_per_step=2, process_set=PS)
    acc.zero_grad()
    for _ in range(2):
        F.mse_loss(model(x[:4]), y[:4]).backward()
    raises(AssertionError, lambda: F.mse_loss(model(x[:4]), y[:4]).backward(), "third pass")
    acc.step()
    # fp16 compression of the deltas
    del acc
    gc.collect()
    fp16 = hvd.DistributedOptimizer(sgd(model.parameters()), op=hvd.Adasum,
                                    compression=hvd.Compression.fp16, process_set=PS)
    fp16.zero_grad()
    F.mse_loss(model(x[rank_batch(R, 0)]), y[rank_batch(R, 0)]).backward()
    fp16.step()
    return {"params": [bits(p) for p in model.parameters()]}


# -- sparse allreduce ------------------------------------------------------------------

def rank_sparse(r: int, hybrid: bool) -> torch.Tensor:
    """Rank r's sparse tensor: r + 1 entries (rank 0 none when hybrid), duplicates allowed."""
    count = r if hybrid else r + 1
    gen = torch.Generator().manual_seed(50 + r)
    if hybrid:  # as nn.Embedding's gradient: sparse rows, dense columns
        idx = torch.randint(0, 6, (1, count), generator=gen)
        return torch.sparse_coo_tensor(idx, torch.randn(count, 3, generator=gen), (6, 3))
    idx = torch.randint(0, 4, (2, count), generator=gen)
    return torch.sparse_coo_tensor(idx, torch.randn(count, generator=gen), (4, 4))


@check
def sparse_allreduce() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for hybrid in (False, True):
        tensors = [rank_sparse(r, hybrid) for r in range(N)]
        dense_sum = sum(t.to_dense() for t in tensors)
        for op, expected in ((hvd.Sum, dense_sum), (hvd.Average, dense_sum / N)):
            handle = hvd.sparse_allreduce_async(tensors[R], f"sparse.{hybrid}.{op}", op, PS)
            assert callable(handle), "Horovod's sparse handle is called to get the result"
            result = handle() if op == hvd.Sum else hvd.synchronize(handle)
            assert result.is_sparse and result.shape == tensors[R].shape
            assert result._nnz() == sum(t._nnz() for t in tensors), "every rank's entries"
            assert torch.allclose(result.to_dense(), expected, atol=1e-6), \
                f"{op}: {result.to_dense()} != {expected}"
            out[f"{hybrid}.{op}"] = bits(result.coalesce().values())
    empty = torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0),
                                    (3, 3))
    handle = hvd.sparse_allreduce_async(empty, "sparse.empty", hvd.Average, PS)
    result = hvd.synchronize(handle)
    assert result.is_sparse and result._nnz() == 0 and result.shape == (3, 3)
    out["dense"] = raises(ValueError, lambda: hvd.sparse_allreduce_async(
        torch.ones(2), "x", hvd.Sum, PS), "dense tensor")
    out["op"] = raises(ValueError, lambda: hvd.sparse_allreduce_async(
        rank_sparse(R, False), "x", hvd.Max, PS), "op=Max")
    return out


class EmbeddingModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.emb = torch.nn.Embedding(20, 4, sparse=True)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(idx).mean(dim=1))


def embedding_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(8)
    idx = torch.randint(0, 20, (STEPS * LOCAL * N, 3), generator=gen)
    return idx, torch.randn(STEPS * LOCAL * N, 1, generator=gen)


def embedding_training(distributed: bool, **kwargs: Any) -> torch.nn.Module:
    idx, y = embedding_data()
    model = EmbeddingModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    if distributed:
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       process_set=PS, **kwargs)
    for step in range(STEPS):
        # one process takes the concatenated batch of every rank
        sl = rank_batch(R, step) if distributed else slice(step * LOCAL * N,
                                                           (step + 1) * LOCAL * N)
        opt.zero_grad()
        F.mse_loss(model(idx[sl]), y[sl]).backward()
        opt.step()
        assert model.emb.weight.grad.is_sparse, "the embedding's gradient stays sparse"
    return model


@check
def sparse_embedding_training() -> dict[str, Any]:
    reference = [p.detach() for p in embedding_training(False).parameters()]
    out = {}
    for as_dense in (False, True):
        model = embedding_training(True, sparse_as_dense=as_dense)
        for (name, p), e in zip(model.named_parameters(), reference):
            diff = (p.detach() - e).abs().max().item()
            assert diff < 1e-5, f"sparse_as_dense={as_dense} {name}: off by {diff:.3g}"
        out[str(as_dense)] = [bits(p) for p in model.parameters()]
    return out


def write_results() -> None:
    path = OUT / f"result-{hvd.rank()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(RESULTS, indent=1, default=str))
    tmp.replace(path)


def run(label: str, fn: Callable[[], Any]) -> None:
    start = time.monotonic()
    try:
        RESULTS[label] = {"ok": True, "value": fn()}
    except BaseException:  # noqa: BLE001 - reported in the results
        RESULTS[label] = {"ok": False, "error": traceback.format_exc()}
        print(f"rank {hvd.rank()}: check {label} FAILED\n{RESULTS[label]['error']}", flush=True)
    RESULTS[label]["seconds"] = round(time.monotonic() - start, 3)
    write_results()


def main() -> int:
    global R, N, PS
    OUT.mkdir(parents=True, exist_ok=True)
    hvd.init()
    assert hvd.size() == 4, f"this suite needs 4 workers, got {hvd.size()}"
    sets = {label: hvd.global_process_set if len(ranks) == 4 else hvd.add_process_set(ranks)
            for label, ranks in GROUPS.items()}
    RESULTS["_meta"] = {"rank": hvd.rank(), "size": hvd.size()}
    for name, fn, per_group in CHECKS:
        for label, ranks in GROUPS.items() if per_group else [("np4", GROUPS["np4"])]:
            if hvd.rank() not in ranks:
                continue
            R, N, PS = ranks.index(hvd.rank()), len(ranks), sets[label]
            run(f"{name}[{label}]", fn)
    hvd.barrier()
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
