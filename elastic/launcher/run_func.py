"""`elastic.run`: Horovod's `horovod.run(func, ...)`, on Horde's launcher.

Starts `num_proc` workers on this machine as `horderun` does (an embedded etcd unless
`HORDE_RENDEZVOUS` names one), runs `func(*args, **kwargs)` in each and returns their
results in rank order. The function travels to the workers with cloudpickle through a
private folder of the caller's: it is the job owner's own code, run by the owner's own
processes on the owner's machine, and results come back the same way, never from a peer.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import site
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import cloudpickle

from elastic.launcher import hosts as hostlib
from elastic.launcher.cli import UsageError, build_plan, make_parser
from elastic.launcher.launch import Launcher
from elastic.launcher.run_task import FUNC_FILE, RUN_DIR_ENV, record_path

logger = logging.getLogger(__name__)


def run(
    func: Callable[..., Any],
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    num_proc: int = 1,
    min_num_proc: int | None = None,
    max_num_proc: int | None = None,
    slots: int | None = None,
    reset_limit: int | None = None,
    cooldown_range: tuple[float, float] | None = None,
    hosts: str | None = None,
    hostfile: str | None = None,
    host_discovery_script: str | None = None,
    start_timeout: float | None = None,
    ssh_port: int | None = None,
    ssh_identity_file: str | None = None,
    disable_cache: bool | None = None,
    output_filename: str | None = None,
    verbose: bool | None = None,
    use_gloo: bool | None = None,
    use_mpi: bool | None = None,
    mpi_args: str | None = None,
    network_interface: str | None = None,
    network_interfaces: Iterable[str] | None = None,
    executable: str | None = None,
    np: int | None = None,
    min_np: int | None = None,
    max_np: int | None = None,
) -> list[Any]:
    """Run `func(*args, **kwargs)` on `num_proc` workers here; their results in rank order.

    Horovod 0.28's signature; how results, errors and hosts differ from Horovod's is in
    docs/migrating-from-horovod.md (a raising worker gives a `RuntimeError` naming its rank).
    """
    if network_interface:
        warnings.warn("network_interface is deprecated, use network_interfaces instead",
                      DeprecationWarning, stacklevel=2)
        network_interfaces = network_interface.split(",")
    for old, new, value in (("np", "num_proc", np), ("min_np", "min_num_proc", min_np),
                            ("max_np", "max_num_proc", max_np)):
        if value is not None:
            warnings.warn(f"{old} is deprecated, use {new} instead", DeprecationWarning,
                          stacklevel=2)
    num_proc = np if np is not None else num_proc
    min_num_proc = min_np if min_np is not None else min_num_proc
    max_num_proc = max_np if max_np is not None else max_num_proc
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    if hosts is not None and hostfile is not None:
        raise ValueError("give hosts or hostfile, not both")
    if use_gloo and use_mpi:
        raise ValueError("give use_gloo or use_mpi, not both")
    if use_mpi:
        raise ValueError("use_mpi=True is not supported: Horde runs collectives on Gloo/NCCL "
                         "process groups; leave use_mpi unset")
    _refuse_remote_hosts(hosts, hostfile, slots or 1)
    for name, value in (("ssh_port", ssh_port), ("ssh_identity_file", ssh_identity_file),
                        ("disable_cache", disable_cache), ("mpi_args", mpi_args)):
        if value is not None:
            logger.warning("elastic.run: %s is ignored (Horde starts workers on this machine "
                           "only, without SSH or MPI)", name)

    ns = make_parser().parse_args([])
    ns.np, ns.min_np, ns.max_np = num_proc, min_num_proc, max_num_proc
    ns.slots_per_host, ns.reset_limit, ns.start_timeout = slots, reset_limit, start_timeout
    ns.blacklist_cooldown_range = list(cooldown_range) if cooldown_range else None
    ns.hosts, ns.hostfile, ns.host_discovery_script = hosts, hostfile, host_discovery_script
    ns.network_interfaces = ",".join(network_interfaces) if network_interfaces else None
    ns.output_filename, ns.verbose = output_filename, bool(verbose)
    ns.log_level = "DEBUG" if verbose else "WARNING"  # Horovod's default level for run()
    ns.coordinator = os.environ.get("HORDE_COORDINATOR") or "none"
    ns.command = [executable or sys.executable, "-m", "elastic.launcher.run_task"]
    try:
        plan = build_plan(ns)
    except UsageError as exc:
        raise ValueError(_as_keywords(str(exc))) from None

    run_dir = tempfile.mkdtemp(prefix="horde-run-")  # private (0700): nobody else reads it
    try:
        try:
            with open(os.path.join(run_dir, FUNC_FILE), "wb") as handle:
                cloudpickle.dump((func, tuple(args), dict(kwargs or {})), handle)
        except Exception as exc:
            raise TypeError(f"elastic.run cannot ship {func!r} to its workers: {exc}") from exc
        plan.announce = False
        plan.extra_env.update({RUN_DIR_ENV: run_dir, "PYTHONPATH": _worker_pythonpath()})
        launcher = Launcher(plan)
        code = launcher.run()
        if code == 128 + signal.SIGINT:
            raise KeyboardInterrupt
        return _results(run_dir, launcher, code, plan.rdzv.elastic)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _refuse_remote_hosts(hosts: str | None, hostfile: str | None, slots: int) -> None:
    if hosts is None and hostfile is None:
        return
    listed = (hostlib.parse_hosts(hosts, slots) if hosts is not None
              else hostlib.parse_hostfile(hostfile or "", slots))
    _, remote = hostlib.local_slots(listed)
    if remote:
        raise ValueError(
            f"elastic.run starts workers on this machine only (Horde never SSHes into hosts), "
            f"but the hosts include {', '.join(remote)}; list only localhost, or run a script "
            "with horderun on each machine (horderun --join adds them to a job)")


def _as_keywords(message: str) -> str:
    """horderun's flag names in an error, as `elastic.run`'s keywords."""
    for flag, keyword in (("--min-np", "min_num_proc"), ("--max-np", "max_num_proc"),
                          ("-np", "num_proc"), ("--slots-per-host", "slots"),
                          ("--reset-limit", "reset_limit"), ("--mpi", "use_mpi")):
        message = message.replace(flag, keyword)
    return message


def _worker_pythonpath() -> str:
    """The caller's own import path entries first, so `func`'s module imports in workers.

    Entries of the interpreter and its site directories are left out: they are on every
    worker's path already, and a site directory on PYTHONPATH would skip its .pth files.
    """
    system = [sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()]
    user_site = site.getusersitepackages()
    own = []
    for entry in sys.path:
        path = os.path.abspath(entry or os.getcwd())
        if path == user_site or any(path == s or path.startswith(s + os.sep) for s in system):
            continue
        if path not in own:
            own.append(path)
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(own + ([inherited] if inherited else []))


def _results(run_dir: str, launcher: Launcher, code: int, elastic: bool) -> list[Any]:
    records = []
    for worker in launcher.workers:
        try:
            with open(record_path(run_dir, str(worker.index)), "rb") as handle:
                records.append(cloudpickle.load(handle))
        except FileNotFoundError:
            continue
    failures = sorted((r for r in records if not r["ok"]), key=lambda r: r["when"])
    if code != 0 or (not elastic and failures):
        if failures:
            first = failures[0]
            raise RuntimeError(
                f"elastic.run: the function raised {first['type']} on rank {first['rank']}: "
                f"{first['message']}\n--- traceback of rank {first['rank']} ---\n"
                f"{first['traceback']}") from _exception(first["error"])
        codes = {w.index: w.code for w in launcher.workers}
        raise RuntimeError(f"elastic.run: the job failed (exit code {code}; worker exit codes "
                           f"{codes}); the workers' output above says why")
    done: dict[int, dict[str, Any]] = {}
    for record in sorted((r for r in records if r["ok"]), key=lambda r: r["when"]):
        done[record["rank"]] = record  # a rank that finished twice (elastic): the latest wins
    if not elastic and sorted(done) != list(range(len(launcher.workers))):
        raise RuntimeError(f"elastic.run: results came back from ranks {sorted(done)}, "
                           f"expected 0..{len(launcher.workers) - 1}")
    return [done[rank]["value"] for rank in sorted(done)]


def _exception(data: bytes | None) -> BaseException | None:
    """The worker's exception object, when this process can rebuild it."""
    if data is None:
        return None
    try:
        exc = cloudpickle.loads(data)
    except Exception:  # noqa: BLE001 - its type, message and traceback are in the message
        return None
    return exc if isinstance(exc, BaseException) else None
