"""Wire bytes: what a worker really sends per training step, dense versus top-k.

    sudo -E python benchmarks/wire_bytes.py [--steps 10] [--warmup 3] [--json PATH]

Four workers, each in its own network namespace joined by a veth pair to a bridge
(`benchmarks/workers/netlab.py`; links not shaped: bytes do not depend on the rate), an
embedded etcd listening on the bridge, one `horderun -np 1` per namespace
(`--network-interfaces` of the namespace's veth, so Gloo binds and advertises it). The
worker (`benchmarks/workers/comm_worker.py`) trains an MLP 1024-2048-2048-10 (6.3 M
parameters; all but the last bias are sparsified) with `hvd.DistributedOptimizer` and

- dense fp32 (Horovod's allreduce, `Compression.none`) and optionally dense fp16,
- `Compression.topk(0.01)` and `Compression.topk(0.001)` (fp32 values, synchronous),
  optionally with `fp16_values=True`.

After `--warmup` steps each worker reads, between barriers, before and after `--steps`
more steps: its interface's tx bytes (`/sys/class/net/IF/statistics`: Ethernet frames,
so TCP/IP headers, ACKs for what it received and etcd keep-alives included), the TCP
payload its own sockets sent (`ss -tinp`: Gloo connections, etcd separately), and
Horde's counter (`optimizer.communication_stats()["bytes_sent"]`). Per worker per step,
averaged over the workers, these are set against the formula:

- dense: ring allreduce, 2 (N-1)/N * d * b (b = 4 fp32, 2 fp16);
- top-k: allgather, (N-1) * [24 + 8-padded k (4 + value bytes)] for the sparse part
  plus (N-1) * [24 + 8-padded small * 4] for the tensors sent dense (here one bias).

Goal (issue 3): at least 20x fewer bytes than dense at 1%, 150x at 0.1%. Needs root
(namespaces, veth, bridge); exits with code 2 and says why otherwise. Takes about 2 min.
"""

from __future__ import annotations

import argparse
import math
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

WORKERS = 4
DIMS = (1024, 2048, 2048, 10)
GOALS = {0.01: 20.0, 0.001: 150.0}


def layer_sizes(dims: tuple[int, ...] = DIMS) -> list[int]:
    sizes = []
    for a, b in zip(dims[:-1], dims[1:]):
        sizes += [a * b, b]
    return sizes


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def formula(config: dict[str, Any], n: int = WORKERS, min_sparse_numel: int = 1024) -> float:
    """Bytes one worker sends per step according to the algorithm."""
    sizes = layer_sizes()
    d = sum(sizes)
    if config["compression"] == "dense":
        return 2 * (n - 1) / n * d * 4
    if config["compression"] == "fp16":
        return 2 * (n - 1) / n * d * 2
    large = sum(s for s in sizes if s >= min_sparse_numel)
    small = d - large
    k = max(1, round(config["density"] * large))
    value_bytes = 2 if config.get("fp16_values") else 4
    message = 24 + _pad8(k * (4 + value_bytes))
    if small:
        message += 24 + _pad8(small * 4)
    return (n - 1) * message


def configs(extras: bool) -> list[dict[str, Any]]:
    out = [{"name": "dense fp32", "compression": "dense"},
           {"name": "top-k 1%", "compression": "topk", "density": 0.01},
           {"name": "top-k 0.1%", "compression": "topk", "density": 0.001}]
    if extras:
        out[1:1] = [{"name": "dense fp16", "compression": "fp16"}]
        out += [{"name": "top-k 1% fp16 values", "compression": "topk", "density": 0.01,
                 "fp16_values": True}]
    return out


def worker_args(config: dict[str, Any], steps: int, warmup: int, etcd_port: int) -> list[str]:
    args = ["--hidden", ",".join(map(str, DIMS[1:-1])), "--dim", str(DIMS[0]),
            "--classes", str(DIMS[-1]), "--steps", str(steps), "--warmup", str(warmup),
            "--wire", "{iface}", "--etcd-port", str(etcd_port), "--test-size", "10",
            "--compression", config["compression"], "--momentum", "0"]
    if config["compression"] == "topk":
        args += ["--density", str(config["density"])]
        if config.get("fp16_values"):
            args.append("--fp16-values")
    return args


def summarise(config: dict[str, Any], ranks: list[dict[str, Any]], steps: int
              ) -> dict[str, Any]:
    per_rank = []
    for r in ranks:
        wire = r["wire"]
        delta = wire["delta"]
        sb = wire["stats_before"].get("bytes_sent")
        sa = wire["stats_after"].get("bytes_sent")
        per_rank.append({
            "rank": r["rank"], "iface": r["iface"],
            "iface_tx": delta["tx_bytes"] / steps, "iface_rx": delta["rx_bytes"] / steps,
            "tcp_sent": delta["gloo_sent"] / steps,
            "tcp_received": delta["gloo_received"] / steps,
            "etcd_sent": delta["etcd_sent"] / steps,
            "local_sent": delta["local_sent"] / steps,
            "horde": (sa - sb) / steps if sa is not None and sb is not None else math.nan,
            "density": wire["stats_after"].get("density"),
        })
    mean = {key: sum(p[key] for p in per_rank) / len(per_rank)
            for key in ("iface_tx", "iface_rx", "tcp_sent", "tcp_received", "etcd_sent",
                        "local_sent", "horde")}
    return {**config, "formula": formula(config), **mean, "per_rank": per_rank,
            "params": ranks[0]["params"], "steps": steps}


def _kb(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value / 1e3:.1f}"


def report(results: list[dict[str, Any]]) -> str:
    dense = next(r for r in results if r["compression"] == "dense")
    rows = []
    for r in results:
        horde_vs_socket = (r["horde"] / r["tcp_sent"] - 1) * 100 if not math.isnan(
            r["horde"]) and r["tcp_sent"] else math.nan
        rows.append([
            r["name"], _kb(r["formula"]), _kb(r["horde"]), _kb(r["tcp_sent"]),
            _kb(r["iface_tx"]),
            "n/a" if math.isnan(horde_vs_socket) else f"{horde_vs_socket:+.1f}%",
            _kb(r["tcp_sent"] - (r["formula"] if math.isnan(r["horde"]) else r["horde"])),
            f"{(r['tcp_sent'] / r['formula'] - 1) * 100:+.1f}%",
            f"{dense['tcp_sent'] / r['tcp_sent']:.1f}x",
            f"{dense['iface_tx'] / r['iface_tx']:.1f}x",
            f"{dense['formula'] / r['formula']:.1f}x",
        ])
    headers = ["config", "formula kB", "Horde kB", "socket kB", "iface kB",
               "Horde vs socket", "socket extra kB", "socket vs formula", "fewer (socket)",
               "fewer (iface)",
               "fewer (formula)"]
    out = [table(headers, rows), ""]
    for r in results:
        goal = GOALS.get(r.get("density")) if r["compression"] == "topk" and not r.get(
            "fp16_values") else None
        if goal:
            got = dense["tcp_sent"] / r["tcp_sent"]
            out.append(f"goal {r['name']}: >= {goal:g}x fewer bytes than dense: "
                       f"{got:.1f}x at the socket, {dense['iface_tx'] / r['iface_tx']:.1f}x "
                       f"at the interface -> {'met' if got >= goal else 'NOT met'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument("--extras", action="store_true",
                        help="also dense fp16 and top-k 1%% with fp16 values")
    parser.add_argument("--coordinator", default="none",
                        help="horderun --coordinator: 'none' (default: the transport alone) or "
                        "'embedded' (credit reporting on, as horderun does by default)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds one configuration may take (default 180)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    started = time.monotonic()

    def body(lab: Any, etcd: Any, tmp: Path) -> None:
        for config in configs(args.extras):
            sys.stderr.write(f"wire_bytes: {config['name']} ...\n")
            ranks = run_in_lab(lab, etcd.url,
                               worker_args(config, args.steps, args.warmup, etcd.port),
                               tmp / config["name"].replace(" ", "_").replace("%", "pc"),
                               args.timeout, config["name"], args.coordinator)
            results.append(summarise(config, ranks, args.steps))

    code = run_in_netlab("wire_bytes", "wb", WORKERS, args.keep_logs, body)
    if code:
        return code
    elapsed = time.monotonic() - started
    params = results[0]["params"]
    print(f"Wire bytes per worker per step: {WORKERS} workers in network namespaces, MLP "
          f"{'-'.join(map(str, DIMS))} ({params / 1e6:.2f} M parameters), "
          f"{args.steps} measured steps after {args.warmup}, horderun --coordinator "
          f"{args.coordinator}; {elapsed:.0f} s")
    print("per worker per step, kB = 1000 bytes; socket extra = socket - Horde's counter "
          "(dense: - formula)")
    print("formula: ring allreduce 2(N-1)/N*d*b (dense), allgather (N-1)*(24+k*(4+b)+small "
          "dense part) (top-k); Horde: communication_stats()['bytes_sent']; socket: TCP "
          "payload of the worker's Gloo sockets (ss); iface: bytes of the frames its veth sent")
    print(report(results))
    if args.json:
        write_json(args.json, {"benchmark": "wire_bytes", "workers": WORKERS,
                               "dims": list(DIMS), "steps": args.steps, "warmup": args.warmup,
                               "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
