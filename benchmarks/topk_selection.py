"""Top-k selection: Horde's sampled-threshold selection against exact `torch.topk`.

    python benchmarks/topk_selection.py [--numel 25000000] [--repeats 9]
                                        [--device auto|cpu|cuda] [--threads N]
                                        [--quiet-wait SECONDS] [--json PATH]

For each distribution (normal; Student-t with 1.5 degrees of freedom, heavy-tailed) and
density (1%, 0.1%) of a flat float32 buffer, one run measures side by side, interleaved
(the order alternates each repeat, so drift of a shared machine hits all alike):
- exact: `torch.topk(x.abs(), k)` (values and indices, as a sparsifier needs them);
- horde: `select_topk(x, k)` from scratch (a fresh sample each call);
- horde+hint: `select_topk(y, k, hint=...)` on a second draw `y`, with the hint that the
  selection on `x` returned (what a training step reuses from the last one).
It reports median times, the speedup of the cold selection over exact (median of the
ratios within a repeat, and their range), the selected count over k, passes, and checks
that the selected entries are the largest in magnitude. On a shared machine each repeat
first waits (up to --quiet-wait s) for other work to calm down. On CPU the thread count
is set to the machine's cores; with CUDA available, `--device auto` runs the table on
the GPU as well.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from benchtable import table, wait_for_quiet, write_json  # noqa: E402

from elastic.codecs import select_topk  # noqa: E402


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make(kind: str, n: int, seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    if kind == "student-t(1.5)":
        chi = torch.distributions.Gamma(0.75, 0.5).sample((n,))
        x.div_(torch.sqrt(chi / 1.5))
    return x.to(device)


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, out


def check_top(x: torch.Tensor, sel, exact_values: torch.Tensor) -> bool:
    """The selected magnitudes are the `count` largest (exact_values sorted descending)."""
    if sel.count == 0:
        return False
    smallest = float(x[sel.indices.long()].abs().min())
    return smallest >= float(exact_values[sel.count - 1]) and bool(
        (sel.indices[1:] > sel.indices[:-1]).all())


def measure(x: torch.Tensor, y: torch.Tensor, k: int, device: str, repeats: int,
            quiet_wait: float) -> dict[str, object]:
    """Interleaved repeats of exact topk, cold selection and hinted selection."""
    select_topk(x, k)  # warm-up (allocator, lazy init), not measured
    torch.topk(x.abs(), k)
    times: dict[str, list[float]] = {"exact": [], "horde": [], "hint": []}
    ratios: list[float] = []
    passes: list[int] = []
    exact_ok = True
    for rep in range(repeats):
        wait_for_quiet(quiet_wait)
        hint = select_topk(x, k).hint
        runs: list[tuple[str, Callable[[], object]]] = [
            ("exact", lambda: torch.topk(x.abs(), k)),
            ("horde", lambda: select_topk(x, k)),
            ("hint", lambda: select_topk(y, k, hint=hint)),  # noqa: B023 - called at once
        ]
        if rep % 2:
            runs.reverse()
        results = {}
        for name, fn in runs:
            ms, results[name] = timed(fn, device)
            times[name].append(ms)
        for name, buf in (("horde", x), ("hint", y)):
            sel = results[name]
            ratios.append(sel.count / k)
            passes.append(sel.passes)
            ref = results["exact"].values if name == "horde" else torch.topk(y.abs(), k).values
            exact_ok = exact_ok and check_top(buf, sel, ref)
    med = {name: statistics.median(v) for name, v in times.items()}
    # Ratios of runs made back to back (same repeat) share the machine's state best.
    paired = sorted(e / h for e, h in zip(times["exact"], times["horde"]))
    paired_hint = sorted(e / h for e, h in zip(times["exact"], times["hint"]))
    return {
        "exact_ms": med["exact"], "horde_ms": med["horde"], "hint_ms": med["hint"],
        "speedup": statistics.median(paired), "speedup_min": paired[0],
        "speedup_max": paired[-1], "speedup_hint": statistics.median(paired_hint),
        "count_over_k_min": min(ratios), "count_over_k_max": max(ratios),
        "max_passes": max(passes), "exact_set": exact_ok,
    }


def bench(device: str, numel: int, repeats: int, quiet_wait: float
          ) -> list[dict[str, object]]:
    rows = []
    for kind in ("normal", "student-t(1.5)"):
        x = make(kind, numel, 1, device)
        y = make(kind, numel, 2, device)
        for density in (0.01, 0.001):
            k = int(numel * density)
            row = {"device": device, "distribution": kind, "density": density, "k": k}
            row.update(measure(x, y, k, device, repeats, quiet_wait))
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="before each repeat, wait up to this many seconds for the "
                             "machine's other work to calm down (default 20)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    devices = (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]) \
        if args.device == "auto" else [args.device]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; torch.set_num_threads({args.threads}) "
          f"({cores()} cores available); {args.numel:,} float32 values; "
          f"median of {args.repeats} interleaved repeats")
    if "cuda" in devices:
        print(f"GPU: {torch.cuda.get_device_name()}")
    rows = []
    for device in devices:
        rows.extend(bench(device, args.numel, args.repeats, args.quiet_wait))
    print(table(
        ["device", "distribution", "density", "k", "topk ms", "horde ms", "speedup",
         "(range)", "+hint ms", "speedup+hint", "count/k", "passes", "top set"],
        [[r["device"], r["distribution"], f"{100 * r['density']:g}%", r["k"],
          f"{r['exact_ms']:.1f}", f"{r['horde_ms']:.1f}", f"{r['speedup']:.1f}x",
          f"{r['speedup_min']:.1f}-{r['speedup_max']:.1f}",
          f"{r['hint_ms']:.1f}", f"{r['speedup_hint']:.1f}x",
          f"{r['count_over_k_min']:.3f}-{r['count_over_k_max']:.3f}", r["max_passes"],
          "exact" if r["exact_set"] else "WRONG"] for r in rows]))
    print("ms: medians; speedup: median (and range) of topk/horde in the same repeat; "
          "count/k: worst and best over repeats (never above 1); passes: thresholds tried "
          "in one call (most); top set: the selected entries are the largest.")
    if args.json:
        write_json(args.json, {"numel": args.numel, "threads": args.threads, "rows": rows})
    return 0 if all(r["exact_set"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
