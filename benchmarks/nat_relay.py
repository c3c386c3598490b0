"""Members behind NAT: time to target through the relay against every member reachable.

    sudo -E python benchmarks/nat_relay.py [--budget 75] [--rate 100] [--json PATH]

Four workers, each in its own network namespace on a bridge (`benchmarks/workers/
netlab.py`), every link tbf-limited at `--rate` Mbit/s at both ends; an embedded etcd on
the bridge; one `horderun -np 1` per namespace. Worker 0's `horderun` creates the job, so
it also serves the relay (on its namespace's address, behind the same 100 Mbit/s link).
The model and task are those of `home_links.py` (MLP 1024-2048-2048-10, 6.3 M
parameters), with top-k 1% (`Compression.topk(0.01)`), S=0.

Three runs, side by side:
- all reachable: every member accepts inbound connections, so the generation is direct
  Gloo (as before relays existed);
- all reachable, relay groups (`--relay always`): the relay's process groups with every
  pair direct: what the Python/ZeroMQ transport costs against Gloo, routing aside;
- 2 behind NAT: namespaces 2 and 3 drop every inbound connection (nftables input policy
  drop, established/related accepted: what a NAT router lets through). The relay's probe
  finds them unreachable, so the generation uses relay groups: pairs with a reachable
  member connect directly (the NAT'd side dials), the pair 2-3 goes through the hub.

Goal (issue 13): time to target with 2 of 4 behind NAT within 1.3x of all reachable.
Needs root and nftables; exits with code 2 and says why otherwise. About 6 minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "workers"))
from benchtable import table, write_json  # noqa: E402
from commbench import run_in_lab, run_in_netlab  # noqa: E402
from home_links import summarise  # noqa: E402

WORKERS = 4
BEHIND_NAT = (2, 3)
GOAL = 1.3
#: (name, namespaces that accept no inbound connection, HORDE_RELAY_MODE)
RUNS = [("all reachable", (), "auto"),
        ("all reachable, relay groups", (), "always"),
        ("2 behind NAT", BEHIND_NAT, "auto")]
TOPK = {"name": "top-k 1%", "args": ["--compression", "topk", "--density", "0.01"],
        "sync": True}
#: what a home router lets in: answers to connections the home opened, nothing else
NO_INBOUND = ("table inet horde_nat {\n chain inbound {\n  type filter hook input priority 0; "
              "policy drop;\n  iifname \"lo\" accept\n  ct state established,related accept\n"
              " }\n}\n")


def block_inbound(lab: Any, i: int, on: bool) -> None:
    """Make namespace i accept no inbound connection (`on`), or undo it."""
    base = ["ip", "netns", "exec", lab.namespace(i), "nft"]
    if on:
        subprocess.run([*base, "-f", "-"], input=NO_INBOUND, text=True, check=True,
                       timeout=30)
    else:
        subprocess.run([*base, "delete", "table", "inet", "horde_nat"], check=False,
                       timeout=30, capture_output=True)


def relay_generations(url: str, seen: set[str]) -> list[str]:
    """The generations of jobs not in `seen` (added) that went through the relay, as
    "job/gN (reachable flags)": proof of which transport a run used."""
    from rendezvous import backend_from_url
    from rendezvous.generation import Generation

    backend = backend_from_url(url)
    try:
        kvs, _rev = backend.get_prefix("/")
    finally:
        backend.close()
    found = []
    for kv in kvs:
        key = kv.key if isinstance(kv.key, str) else kv.key.decode()
        if not key.endswith("/control/generation") or key in seen:
            continue
        seen.add(key)
        gen = Generation.from_json(kv.value)
        if gen.relay:
            found.append(f"{key.split('/')[-3]}/g{gen.id} "
                         f"({''.join('R' if m.reachable else 'N' for m in gen.members)})")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0, help="Mbit/s of every link")
    parser.add_argument("--budget", type=float, default=75.0,
                        help="seconds of training per run (default 75)")
    parser.add_argument("--steps", type=int, default=60, help="most steps per run")
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy (0.95)")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--momentum", type=float, default=0.5)
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    import shutil

    if shutil.which("nft") is None:
        sys.stderr.write("nat_relay: cannot run: nftables is not installed "
                         "(apt-get install nftables)\n")
        return 2
    common = ["--steps", str(args.steps), "--time-budget", str(args.budget),
              "--snapshot-interval", "0.5", "--target", str(args.target),
              "--lr", str(args.lr), "--momentum", str(args.momentum), *TOPK["args"]]
    results: list[tuple[str, dict[str, Any], str]] = []
    seen: set[str] = set()
    started = time.monotonic()

    def body(lab: Any, etcd: Any, tmp: Path) -> None:
        lab.shape(args.rate)
        for name, hidden, mode in RUNS:
            for i in hidden:
                block_inbound(lab, i, True)
            os.environ["HORDE_RELAY_MODE"] = mode
            try:
                sys.stderr.write(f"nat_relay: {name} ...\n")
                out = tmp / name.replace(" ", "_").replace(",", "")
                ranks = run_in_lab(lab, etcd.url, common, out, args.budget + 240, name)
            finally:
                os.environ.pop("HORDE_RELAY_MODE", None)
                for i in hidden:
                    block_inbound(lab, i, False)
            relayed = relay_generations(etcd.url, seen)
            results.append((name, summarise(TOPK, args.rate, ranks, args.target),
                            "relay groups" if relayed else "direct Gloo"))
            r = results[-1][1]
            sys.stderr.write(f"nat_relay:   time to target {r['time_to_target']:.1f} s, "
                             f"{r['steps']} steps; generations through the relay: "
                             f"{relayed}\n")
            if bool(relayed) != (mode == "always" or bool(hidden)):
                raise RuntimeError(f"{name}: relay generations {relayed} are not what the "
                                   "run should have used")

    code = run_in_netlab("nat_relay", "nr", WORKERS, args.keep_logs, body)
    if code:
        return code
    base = results[0][1]["time_to_target"]
    rows = []
    for name, r, path in results:
        ttt = r["time_to_target"]
        ratio = ttt / base if not (math.isnan(ttt) or math.isnan(base)) else math.nan
        rows.append([name, path, "/".join(map(str, r["steps"])),
                     f"{r['step_time_median']:.3f}",
                     "not reached" if math.isnan(ttt) else f"{ttt:.1f}",
                     "-" if math.isnan(ratio) else f"{ratio:.2f}x",
                     f"{r['final_accuracy'] * 100:.2f}",
                     "yes" if r["identical_parameters"] else "NO"])
    ratio = results[-1][1]["time_to_target"] / base
    print(f"NAT relay: {WORKERS} workers, every link tbf {args.rate:g} Mbit/s at both ends, "
          f"top-k 1%, MLP 1024-2048-2048-10; target {args.target * 100:g}%; "
          f"{time.monotonic() - started:.0f} s")
    print(table(["run", "transport", "steps (per rank)", "step s (median)",
                 f"time to {args.target * 100:g}% s", "vs all reachable", "final acc %",
                 "identical params"], rows))
    print(f"goal: 2 behind NAT within {GOAL:g}x of all reachable: {ratio:.2f}x -> "
          f"{'met' if ratio <= GOAL else 'NOT met'}")
    if args.json:
        write_json(args.json, {"benchmark": "nat_relay", "workers": WORKERS,
                               "rate_mbit": args.rate, "target": args.target,
                               "results": [{"run": n, "transport": p, **r}
                                           for n, r, p in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
