"""What etcd authentication (the embedded etcd's default) costs a job, side by side.

    python benchmarks/etcd_auth_startup.py [--runs 5] [--np 2] [--epochs 1]

Runs the README's main job (`horderun -np 2 python examples/pytorch_digits.py`)
alternately with authentication on (the default) and `--no-etcd-auth`, and prints the
wall time of each `horderun` to its exit: auth adds a root user, a control role, one user
per worker and a login per process. Quote the ratio of medians, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchtable import median, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = {"auth on (default)": [], "--no-etcd-auth": ["--no-etcd-auth"]}


def one_run(flags: list[str], np: int, epochs: int, data_dir: str) -> float:
    argv = [sys.executable, "-m", "elastic.launcher.cli", "-np", str(np), "--data-dir",
            data_dir, *flags, sys.executable, str(REPO / "examples" / "pytorch_digits.py"),
            "--epochs", str(epochs)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("HORDE_ETCD_AUTH", "HORDE_ETCD_USER", "HORDE_ETCD_PASSWORD_FILE"):
        env.pop(name, None)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"horderun {' '.join(flags)} exited {done.returncode}:\n"
                         f"{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="horde-bench-auth-") as data_dir:
        for _ in range(args.runs):
            for mode, flags in MODES.items():  # alternated, so load drifts hit both
                times[mode].append(one_run(flags, args.np, args.epochs, data_dir))
    base = median(times["--no-etcd-auth"])
    rows = [(mode, len(t), median(t), min(t), max(t), f"{median(t) / base:.2f}x")
            for mode, t in times.items()]
    print(table(["mode", "runs", "median s", "min s", "max s", "vs no auth"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
