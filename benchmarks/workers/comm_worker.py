"""Training worker of the communication benchmarks (wire bytes, home links, stragglers).

Started by `horderun` (one per network namespace, or `-np 4` on loopback); an ordinary
Horovod loop on a synthetic but learnable task, with the gradient exchange chosen by flags:

    horderun ... python benchmarks/workers/comm_worker.py --out DIR \
        [--compression dense|fp16|topk] [--density 0.01] [--staleness S] ...

Task: a mixture of `--classes` Gaussians in `--dim` dimensions (class means of norm
`--sep`, unit noise per coordinate); each rank draws its own stream of batches (seed +
rank), the test set is drawn once with a fixed seed. Model: an MLP `dim-hidden...-classes`
(1024-2048-2048-10 has 6.3 M parameters, 99.8% of them in the two large weight matrices).

What is measured, all written to DIR/rank<r>.json:
- every rank: the time of each training step (after an initial barrier), its forward +
  backward time and the time spent in `optimizer.step()`, steps done, the CPU time of the
  process (all threads), `optimizer.communication_stats()`, a digest of the final
  parameters;
- `--wire IFACE`: after `--warmup` steps, counters read between two barriers before and
  after `--steps` more steps: the interface's tx/rx bytes (`/sys/class/net`), and the TCP
  payload this process sent (`ss -tinp`, sockets of this pid), split into etcd (port
  `--etcd-port`) and the rest (Gloo);
- rank 0 with `--snapshot-interval`: a copy of the parameters at most that often
  (training-clock time stamped); after training, they are evaluated in order until the
  first reaches `--target` accuracy (time to target), then the final model;
- `--slow-rank R --slow-factor F`: rank R sleeps after each step so that its step takes F
  times its own compute time (plus `--step-delay`, emulated accelerator time on every rank).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import elastic.torch as hvd


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for rank<r>.json")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--hidden", default="2048,2048", help="comma-separated hidden widths")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--sep", type=float, default=6.0, help="norm of the class means")
    p.add_argument("--batch", type=int, default=32, help="per worker")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--compression", choices=["dense", "fp16", "topk"], default="dense")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--fp16-values", action="store_true")
    p.add_argument("--no-momentum-correction", action="store_true")
    p.add_argument("--staleness", type=int, default=0)
    p.add_argument("--round-deadline", type=float, default=None)
    p.add_argument("--steps", type=int, default=40, help="most training steps per worker")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="stop after this many seconds of training (0: steps only)")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured steps first (--wire)")
    p.add_argument("--wire", default="", help="interface whose counters to read")
    p.add_argument("--etcd-port", type=int, default=0)
    p.add_argument("--idle", type=float, default=0.0,
                   help="seconds to sleep inside the --wire window after the steps "
                   "(separates traffic per second from traffic per step)")
    p.add_argument("--snapshot-interval", type=float, default=0.0,
                   help="rank 0 keeps a parameter copy at most this often (seconds)")
    p.add_argument("--target", type=float, default=0.0, help="accuracy for time to target")
    p.add_argument("--slow-rank", type=int, default=-1)
    p.add_argument("--slow-factor", type=float, default=1.0)
    p.add_argument("--step-delay", type=float, default=0.0,
                   help="seconds every rank sleeps per step (emulated accelerator compute)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


class Mixture:
    """Gaussian mixture classification: x = mean[y] + N(0, I)."""

    def __init__(self, dim: int, classes: int, sep: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.means = torch.randn(classes, dim, generator=gen)
        self.means *= sep / self.means.norm(dim=1, keepdim=True)
        self.classes = classes

    def batch(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, self.classes, (n,), generator=gen)
        return self.means[y] + torch.randn(n, self.means.shape[1], generator=gen), y


def make_model(dim: int, hidden: list[int], classes: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    width = dim
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), 500):
            correct += int((model(x[start:start + 500]).argmax(1) == y[start:start + 500]).sum())
    return correct / len(y)


_SS_BYTES = re.compile(r"\bbytes_(sent|acked|received):(\d+)")
_SS_PID = re.compile(r"pid=(\d+)")


def socket_bytes(etcd_port: int) -> dict[str, object]:
    """TCP payload bytes of this process's sockets, from `ss -tinp`: to etcd, over loopback
    (never on the link), and the rest (Gloo, the store); and per socket for diagnosis."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=10).stdout
    totals: dict[str, object] = {"gloo_sent": 0, "gloo_received": 0, "etcd_sent": 0,
                                 "etcd_received": 0, "local_sent": 0, "local_received": 0,
                                 "sockets": 0}
    per_socket: dict[str, int] = {}
    pid = os.getpid()
    owner: set[int] = set()
    name = ""
    peer_port = None
    peer_host = ""
    for line in out.splitlines():
        if line and not line[0].isspace():
            fields = line.split()
            owner = {int(m) for m in _SS_PID.findall(line)}
            name = f"{fields[3]}->{fields[4]}" if len(fields) > 4 else line
            peer = fields[4] if len(fields) > 4 else ":0"
            peer_host, _, port = peer.rpartition(":")
            peer_port = int(port) if port.isdigit() else None
        if pid not in owner:
            continue
        found = dict(_SS_BYTES.findall(line))
        if not found:
            continue
        if "127.0.0." in peer_host or peer_host.strip("[]") == "::1":
            kind = "local"  # loopback: never on the link (e.g. a coordinator in this netns)
        elif peer_port == etcd_port:
            kind = "etcd"
        else:
            kind = "gloo"
        totals[f"{kind}_sent"] += int(found.get("sent", 0))  # type: ignore[operator]
        totals[f"{kind}_received"] += int(found.get("received", 0))  # type: ignore[operator]
        totals["sockets"] += 1  # type: ignore[operator]
        per_socket[name] = per_socket.get(name, 0) + int(found.get("sent", 0))
    totals["per_socket"] = per_socket
    return totals


def wire_counters(iface: str, etcd_port: int) -> dict[str, object]:
    base = Path("/sys/class/net") / iface / "statistics"
    counters: dict[str, object] = {name: int((base / name).read_text()) for name in
                ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")}
    counters.update(socket_bytes(etcd_port))
    return counters


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    task = Mixture(args.dim, args.classes, args.sep, args.seed)
    test_x, test_y = task.batch(args.test_size, torch.Generator().manual_seed(args.seed + 999))
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)
    torch.manual_seed(args.seed)
    model = make_model(args.dim, [int(h) for h in args.hidden.split(",") if h], args.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    if args.compression == "topk":
        compression = hvd.Compression.topk(
            args.density, fp16_values=args.fp16_values,
            momentum_correction=not args.no_momentum_correction)
    elif args.compression == "fp16":
        compression = hvd.Compression.fp16
    else:
        compression = hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(), compression=compression,
        staleness=args.staleness, round_deadline=args.round_deadline)

    waits: list[float] = []

    def one_step() -> float:
        x, y = task.batch(args.batch, gen)
        started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        compute = time.perf_counter() - started
        delay = args.step_delay
        if rank == args.slow_rank:
            delay = args.slow_factor * (compute + args.step_delay) - compute
        if delay > 0:
            time.sleep(delay)
        entered = time.perf_counter()
        if args.staleness:
            optimizer.step(samples=len(y))
        else:
            optimizer.step()
        waits.append(time.perf_counter() - entered)
        return compute

    record: dict[str, object] = {"rank": rank, "size": size, "pid": os.getpid(),
                                 "node": os.environ.get("HORDE_NODE_ID", ""),
                                 "iface": args.wire,
                                 "params": sum(p.numel() for p in model.parameters())}
    for _ in range(args.warmup):
        one_step()
    if args.wire:
        hvd.barrier()
        time.sleep(0.5)  # let delayed ACKs and the barrier's last bytes leave
        before = wire_counters(args.wire, args.etcd_port)
        stats_before = optimizer.communication_stats()
        hvd.barrier()
    hvd.barrier()
    waits.clear()
    cpu_start = time.process_time()
    start = time.perf_counter()
    step_ends: list[float] = []
    computes: list[float] = []
    snapshots: list[tuple[float, int, torch.Tensor]] = []
    last_snap = -1e9
    stop = torch.zeros(1)
    for step in range(1, args.steps + 1):
        computes.append(one_step())
        now = time.perf_counter() - start
        step_ends.append(now)
        if rank == 0 and args.snapshot_interval and now - last_snap >= args.snapshot_interval:
            snapshots.append((now, step, torch.cat([p.detach().reshape(-1).clone()
                                                    for p in model.parameters()])))
            last_snap = now
        if args.time_budget:
            if args.staleness:
                if now >= args.time_budget:
                    break
            else:  # synchronous: the ranks must agree on the last step
                stop[0] = 1.0 if now >= args.time_budget else 0.0
                if hvd.allreduce(stop, name="bench.stop", op=hvd.Max).item() > 0:
                    break
    train_time = time.perf_counter() - start
    cpu_time = time.process_time() - cpu_start
    if args.wire:
        time.sleep(args.idle)
        hvd.barrier()
        time.sleep(0.5)
        after = wire_counters(args.wire, args.etcd_port)
        stats_after = optimizer.communication_stats()
        record["wire"] = {"before": before, "after": after,
                          "delta": {k: after[k] - before[k] for k in after  # type: ignore[operator]
                                    if k != "per_socket"},
                          "stats_before": stats_before, "stats_after": stats_after}
    optimizer.finish()
    record["finish_time"] = time.perf_counter() - start - train_time
    record.update({"steps": len(step_ends), "train_time": train_time, "step_ends": step_ends,
                   "compute": computes, "step_wait": waits, "cpu_time": cpu_time,
                   "stats": optimizer.communication_stats()})
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    record["digest"] = digest.hexdigest()
    if rank == 0:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        record["final_accuracy"] = accuracy(model, test_x, test_y)
        evaluated = []
        if snapshots:
            probe = make_model(args.dim, [int(h) for h in args.hidden.split(",") if h],
                               args.classes)
            for t, step, flat in snapshots:
                offset = 0
                with torch.no_grad():
                    for p in probe.parameters():
                        p.copy_(flat[offset:offset + p.numel()].view_as(p))
                        offset += p.numel()
                acc = accuracy(probe, test_x, test_y)
                evaluated.append({"time": t, "step": step, "accuracy": acc})
                if args.target and acc >= args.target:
                    break
        record["snapshots"] = evaluated
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
