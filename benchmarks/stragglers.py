"""Stragglers: one of four workers 3x slower; what do the others keep, by staleness?

    python benchmarks/stragglers.py [--staleness 0,1,2] [--budget 20] [--json PATH]

Four workers on loopback (`horderun -np 4 --coordinator none`, no namespaces needed),
running `benchmarks/workers/comm_worker.py`: an MLP 256-512-512-10 (0.4 M parameters) on a
10-class Gaussian-mixture task (class means of norm `--sep` in 256 dimensions, unit
noise, batch 32 per worker, a fixed test set of 5000), SGD lr `--lr` momentum `--momentum`
(0.5 by default: with staleness > 0, momentum 0.9 plus delayed dense gradients diverges),
dense gradients, `hvd.DistributedOptimizer(..., staleness=S)`.

A step is the real forward and backward (about 1-2 ms) plus `--step-delay` seconds of
sleep standing for accelerator compute (the machine has 2 cores for 4 workers: sleeping
keeps the workers from competing for CPU, so a slow worker is slow by itself alone). The
straggler (rank 3) sleeps so that each of its steps takes `--slow-factor` (3) times its own
compute + delay.

For each S in `--staleness`, without and with the straggler, the job trains for `--budget`
seconds (S=0: the ranks agree on the last step with a one-value allreduce per step,
S>0: each rank stops on its own clock, then `optimizer.finish()` ends the rounds
together). Reported: the fast workers' throughput (steps/s, mean of ranks 0-2), relative
to the same S without straggler and to S=0 without straggler (Horovod), the straggler's
own, the final test accuracy (after `finish()`, rank 0), whether every member ended with
bit-identical parameters, and the round statistics (rounds, empty rounds, staleness
histogram, dropped contributions).

Goal (issue 3): with S >= 1 the others keep at least 90% of their no-straggler throughput
(synchronous keeps about a third), at final accuracy within 1 point. Takes about 4 min.
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "workers"))
from benchtable import table, wait_for_quiet, write_json  # noqa: E402
from commbench import JobFailed, run_loopback  # noqa: E402

WORKERS = 4
SLOW_RANK = 3
GOAL_KEEP = 0.90


def summarise(staleness: int, straggler: bool, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    fast = [r for r in ranks if r["rank"] != SLOW_RANK]
    slow = next(r for r in ranks if r["rank"] == SLOW_RANK)

    def rate(r: dict[str, Any]) -> float:
        return r["steps"] / r["train_time"]

    stats = ranks[0]["stats"]
    waits = [w for r in fast for w in r["step_wait"]]
    return {
        "staleness": staleness, "straggler": straggler,
        "fast_steps_per_s": statistics.mean(rate(r) for r in fast),
        "fast_steps": [r["steps"] for r in fast],
        "slow_steps_per_s": rate(slow), "slow_steps": slow["steps"],
        "train_time": max(r["train_time"] for r in ranks),
        "finish_time": max(r.get("finish_time", 0.0) for r in ranks),
        "fast_step_wait_median": statistics.median(waits) if waits else math.nan,
        "fast_step_wait_p90": (sorted(waits)[int(0.9 * (len(waits) - 1))]
                               if waits else math.nan),
        "compute_median": statistics.median(c for r in fast for c in r["compute"]),
        "final_accuracy": ranks[0]["final_accuracy"],
        "identical_parameters": len({r["digest"] for r in ranks}) == 1,
        "stats": stats,
    }


def report(results: list[dict[str, Any]]) -> str:
    def find(s: int, straggler: bool) -> dict[str, Any] | None:
        return next((r for r in results if r["staleness"] == s and r["straggler"] == straggler),
                    None)

    horovod = find(0, False)
    rows, lines = [], []
    for r in results:
        own = find(r["staleness"], False)
        keep = r["fast_steps_per_s"] / own["fast_steps_per_s"] if own else math.nan
        keep0 = r["fast_steps_per_s"] / horovod["fast_steps_per_s"] if horovod else math.nan
        stats = r["stats"]
        hist = stats.get("staleness_histogram") or {}
        rows.append([
            r["staleness"], "yes" if r["straggler"] else "no",
            f"{r['fast_steps_per_s']:.2f}", f"{keep * 100:.0f}%", f"{keep0 * 100:.0f}%",
            f"{r['slow_steps_per_s']:.2f}", f"{r['final_accuracy'] * 100:.2f}",
            "yes" if r["identical_parameters"] else "NO",
            f"{r['fast_step_wait_median'] * 1e3:.0f}/{r['fast_step_wait_p90'] * 1e3:.0f}",
            "-" if not r["staleness"] else
            f"{stats.get('rounds', 0)}/{stats.get('empty_rounds', 0)}",
            "-" if not r["staleness"] else " ".join(f"{k}:{v}" for k, v in hist.items()),
            "-" if not r["staleness"] else str(stats.get("dropped_stale", 0)),
        ])
        if r["straggler"] and own:
            gap = (own["final_accuracy"] - r["final_accuracy"]) * 100
            if r["staleness"] >= 1:
                met = keep >= GOAL_KEEP and gap <= 1.0
                lines.append(f"goal S={r['staleness']}: the others keep {keep * 100:.0f}% of "
                             f"their no-straggler throughput (>= {GOAL_KEEP * 100:.0f}%), "
                             f"accuracy {gap:+.2f} points below it (<= 1) -> "
                             f"{'met' if met else 'NOT met'}")
            else:
                lines.append(f"synchronous (S=0): the others keep {keep * 100:.0f}% "
                             f"(about 1/3 expected), accuracy {gap:+.2f} points below")
    headers = ["S", "straggler", "others steps/s", "vs same S", "vs S=0 alone",
               "straggler steps/s", "final acc %", "identical", "step() wait ms med/p90",
               "rounds/empty", "staleness histogram", "dropped"]
    return "\n".join([table(headers, rows), "", *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--staleness", default="0,1,2", help="values of S, comma-separated")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of training per run (default 20)")
    parser.add_argument("--step-delay", type=float, default=0.04,
                        help="emulated accelerator seconds per step (default 0.04)")
    parser.add_argument("--slow-factor", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.5)
    parser.add_argument("--sep", type=float, default=3.0)
    parser.add_argument("--round-deadline", type=float, default=None,
                        help="seconds (default: the library's adaptive deadline)")
    parser.add_argument("--compression", choices=["dense", "topk"], default="dense")
    parser.add_argument("--quiet-wait", type=float, default=10.0,
                        help="wait up to this long for a quiet machine before each run")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    values = [int(x) for x in args.staleness.split(",") if x.strip()]
    if not values or min(values) < 0 or args.slow_factor < 1:
        parser.error("--staleness needs values >= 0 and --slow-factor >= 1")

    def on_signal(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through run_loopback, which stops its job

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="horde-stragglers-"))
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    common = ["--dim", "256", "--hidden", "512,512", "--sep", str(args.sep),
              "--test-size", "5000", "--lr", str(args.lr), "--momentum", str(args.momentum),
              "--steps", "100000", "--time-budget", str(args.budget),
              "--step-delay", str(args.step_delay), "--compression", args.compression]
    if args.round_deadline is not None:
        common += ["--round-deadline", str(args.round_deadline)]
    done = False
    try:
        for s in values:
            for straggler in (False, True):
                extra = ["--staleness", str(s)]
                if straggler:
                    extra += ["--slow-rank", str(SLOW_RANK), "--slow-factor", str(args.slow_factor)]
                what = f"S={s} {'with' if straggler else 'without'} straggler"
                sys.stderr.write(f"stragglers: {what} ...\n")
                wait_for_quiet(args.quiet_wait)
                ranks = run_loopback(WORKERS, [*common, *extra],
                                     tmp / f"s{s}_{'slow' if straggler else 'even'}",
                                     args.budget + 120, what)
                results.append(summarise(s, straggler, ranks))
        done = True
    except JobFailed as exc:
        sys.stderr.write(f"stragglers: {exc}\n(logs kept in {tmp})\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("stragglers: interrupted\n")
        return 130
    finally:
        if done and not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    print(f"Stragglers: {WORKERS} workers on loopback, rank {SLOW_RANK} {args.slow_factor:g}x "
          f"slower per step; MLP 256-512-512-10, {args.compression} gradients, SGD lr "
          f"{args.lr:g} momentum {args.momentum:g}; steps of ~{args.step_delay * 1e3:.0f} ms "
          f"emulated compute + real forward/backward; {args.budget:g} s per run; "
          f"round deadline {'adaptive' if args.round_deadline is None else args.round_deadline};"
          f" {elapsed:.0f} s")
    print(report(results))
    if args.json:
        write_json(args.json, {"benchmark": "stragglers", "workers": WORKERS,
                               "slow_rank": SLOW_RANK, "slow_factor": args.slow_factor,
                               "budget_s": args.budget, "step_delay_s": args.step_delay,
                               "lr": args.lr, "momentum": args.momentum, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
