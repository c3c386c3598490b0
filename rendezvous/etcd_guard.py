"""Keeps an embedded etcd from outliving the process that started it, even after `kill -9`.

Run as a script, `python -I -S etcd_guard.py OWNER_PID DATA_DIR -- ETCD_ARGV...` (standard
library only, so it starts in milliseconds and needs no `sys.path`). It starts etcd as its
only child, which the kernel kills if the guard dies, and then watches:

- the owner died (by any signal, SIGKILL included): kill etcd, remove DATA_DIR, exit 0;
- SIGTERM or SIGINT (the owner's normal stop): stop etcd gracefully, exit 0, leave
  DATA_DIR (the owner removes it);
- etcd exited by itself: exit with its code and leave DATA_DIR, so the owner can read
  the log in it and say why.

The owner's death is seen by polling `getppid()` (the guard is re-parented when its owner
dies) rather than by PR_SET_PDEATHSIG on the guard: that signal fires when the *thread*
that started the child ends, which would stop etcd under a live owner that started it
from a short-lived thread.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time

POLL_INTERVAL = 0.1  # seconds between looks at the owner and at etcd
GRACE = 4.0  # seconds etcd gets after SIGTERM; the owner waits a little longer
_PR_SET_PDEATHSIG = 1


def _die_with_guard() -> None:
    """In etcd's process, before exec: SIGKILL when the guard (single-threaded) dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the polling below still stops etcd
        pass


def _stop(proc: subprocess.Popen, sig: int, grace: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--":
        sys.stderr.write("usage: etcd_guard.py OWNER_PID DATA_DIR -- ETCD_ARGV...\n")
        return 2
    owner, data_dir, command = int(argv[1]), argv[2], argv[4:]
    requested: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        requested.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if os.getppid() != owner:  # the owner died before this guard was running
        shutil.rmtree(data_dir, ignore_errors=True)
        return 0
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_guard)  # noqa: PLW1509 - prctl only
    while True:
        code = proc.poll()
        if code is not None:
            return code if code >= 0 else 128 - code
        if requested:
            _stop(proc, signal.SIGTERM, GRACE)
            return 0
        if os.getppid() != owner:
            _stop(proc, signal.SIGKILL, GRACE)  # its data is thrown away: no need to be nice
            shutil.rmtree(data_dir, ignore_errors=True)
            return 0
        time.sleep(POLL_INTERVAL)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
