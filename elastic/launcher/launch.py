"""Start, watch and stop the local workers of a job.

The launcher owns the embedded etcd (when no `--rendezvous` is given), starts this
machine's workers with the environment horovodrun would give them plus Horde's own
`HORDE_*` settings, reports a dead worker to the rendezvous at once (revoking its
lease, so the survivors recover without waiting for the lease to expire), and
decides the exit code.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from elastic.core.stall import Activity, read_activity, waited
from elastic.launcher import hosts as hostlib
from elastic.launcher.enrol import Enrolment, enrol
from elastic.launcher.output import output_paths, pump
from rendezvous import backend_from_url, records
from rendezvous.agent import TRUSTED_MARK, NodeAgent, registration
from rendezvous.backend import RendezvousBackend
from rendezvous.errors import RendezvousError, RendezvousPermissionError, RendezvousTLSError
from rendezvous.etcd_auth import ROOT_USER, EtcdAuthAdmin, EtcdCredentials
from rendezvous.etcd_tls import EtcdTLS
from rendezvous.generation import Generation, JobStatus, NodeInfo
from rendezvous.keys import JobKeys
from rendezvous.settings import RendezvousSettings

logger = logging.getLogger(__name__)

#: Seconds the workers get to stop after SIGTERM before they are killed.
TERMINATE_GRACE = 5.0
_POLL = 0.2


@dataclass
class LaunchPlan:
    """Everything `horderun` resolved from its flags."""

    command: list[str]
    np: int
    rdzv: RendezvousSettings
    rendezvous_url: str | None = None
    join: bool = False
    collective_timeout: float = 60.0
    reset_limit: int | None = None
    advertise_addr: str = "127.0.0.1"
    listen_addr: str = "127.0.0.1"
    """Where the embedded etcd and coordinator serve, and what the printed --join names."""
    hostname: str = ""
    node_prefix: str = ""
    output_filename: str | None = None
    log_level: str = "INFO"
    discovery_script: str | None = None
    slots_per_host: int = 1
    discovery_interval: float = 5.0
    coordinator: str = "embedded"
    coordinator_db: str | None = None
    coordinator_port: int = 0
    data_dir: str = ""
    """Folder of the embedded coordinator's ledger and admin token (kept across runs)."""
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Print the rendezvous and the `--join` command (not for `elastic.run`: its workers
    #: run a function only this process has).
    announce: bool = True
    exit_wait: float | None = None
    """Seconds the other workers may run on after the first one finished (None: forever)."""
    exit_report_interval: float = 30.0
    """After the first worker finished: say every so many seconds who still runs (0: never)."""
    trusted_peers: bool = False
    """Workers fully unpickle their peers' objects (`--trusted-peers`); off: data only."""
    robust_aggregation: int = 0
    """F of multi-Krum (`--robust-aggregation`); published with the job, so joiners use it."""
    etcd_auth: bool = True
    """The embedded etcd runs with authentication (default; `--no-etcd-auth` turns it off):
    each process this launcher starts gets its own control identity."""
    etcd_tls: bool = False
    """The embedded etcd serves https (`--etcd-tls`; the CLI's default when it serves beyond
    loopback) with a CA made at start; this process, its coordinator and its workers verify
    it through HORDE_ETCD_CACERT, joiners through the CA the coordinator sends them."""
    etcd_ca_sha256: str | None = None
    """A --join's pin of the job's etcd CA (`--etcd-ca-sha256`, `AB:CD:...`): the CA the
    coordinator sends with the node's credentials is used only if it has this SHA-256."""


@dataclass
class Worker:
    index: int
    node_id: str
    proc: subprocess.Popen
    threads: list[threading.Thread]
    code: int | None = None
    asked_to_leave: bool = False
    """The launcher told it to leave (host discovery removed its slot)."""


def _die_with_parent() -> None:
    """In the child: own process group, and SIGKILL when the launcher dies."""
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Launcher:
    """Runs one `horderun` invocation to completion and returns its exit code."""

    def __init__(self, plan: LaunchPlan) -> None:
        self.plan = plan
        self.keys = JobKeys(plan.rdzv.prefix, plan.rdzv.job)
        self.workers: list[Worker] = []
        self._etcd = None
        self._etcd_admin: EtcdAuthAdmin | None = None
        self._root_file: Path | None = None
        self._revoked: set[str] = set()
        self._enrolled: dict[str, Enrolment] = {}
        self._secret_files: list[Path] = []  # joined workers' etcd passwords, deleted at exit
        self._join_ca: Path | None = None  # the pinned etcd CA a --join got from the coordinator
        self._next_revoke_check = 0.0
        self._backend: RendezvousBackend | None = None
        self._stop = threading.Event()
        self._signal: int | None = None
        self._next_index = 0
        self._coordinator: object = None
        self._coordinator_url = ""
        self._coordinator_thread: threading.Thread | None = None
        self._relay: object = None
        self._relay_store: object = None
        self._ledger_lock: int | None = None
        self._job_over = False
        self._first_finish: tuple[float, Worker] | None = None
        self._next_report = 0.0

    # -- setup ------------------------------------------------------------------------

    def _connect(self) -> str:
        if self.plan.rendezvous_url is None:
            from rendezvous.embedded import EmbeddedEtcd

            self._etcd = EmbeddedEtcd(host=self.plan.listen_addr, tls=self.plan.etcd_tls)
            url = self._etcd.url
            self._use_embedded_tls()
            if self.plan.etcd_auth:
                return self._connect_with_auth(url)
            if not _is_loopback(self.plan.listen_addr):
                logger.warning(
                    "the embedded etcd serves WITHOUT AUTHENTICATION (--no-etcd-auth) on %s: "
                    "anyone who can reach this address can read and rewrite job %s (register "
                    "nodes, evict workers, end the job). Serve only on a network you trust, "
                    "or leave authentication on (docs/security.md)", url, self.plan.rdzv.job)
        else:
            if self.plan.etcd_auth:
                raise ValueError("--etcd-auth turns authentication on in the embedded etcd; "
                                 "for --rendezvous give this launcher's credentials with "
                                 "HORDE_ETCD_USER / HORDE_ETCD_PASSWORD_FILE (docs/security.md)")
            url = self.plan.rendezvous_url
        timeout = self.plan.rdzv.request_timeout(url)
        credentials = None
        if self._enrols():
            # The launcher reads the job as its first worker's node: a node's etcd user
            # may read the job and write only that node's keys.
            first = self._enrolment(self._node_id(self._next_index))
            credentials = first.etcd
            self._join_ca = self._pinned_ca(url, first)
        self._backend = backend_from_url(url, timeout=timeout, credentials=credentials,
                                         tls=self._join_tls())
        try:
            self._backend.get(self.keys.generation)  # fails fast, with the address
        except RendezvousPermissionError as exc:
            if not self.plan.join or EtcdCredentials.from_env() is not None:
                raise
            raise RendezvousPermissionError(
                f"{exc}. The job's etcd runs with authentication: join with the "
                "--coordinator URL of the owner's join command (its coordinator issues this "
                "node's etcd user), or give credentials with HORDE_ETCD_USER / "
                "HORDE_ETCD_PASSWORD_FILE (docs/security.md)") from None
        return url

    def _enrols(self) -> bool:
        """A --join without credentials of its own gets each worker's etcd user from the
        job's coordinator (none when the job runs without etcd authentication). Not when
        its caller registered the node already (HORDE_COORDINATOR_TOKEN: the volunteer
        client, which fetches the node's etcd user itself)."""
        return (self.plan.join and self.plan.coordinator not in ("", "none", "embedded")
                and EtcdCredentials.from_env() is None
                and not os.environ.get("HORDE_COORDINATOR_TOKEN"))

    def _enrolment(self, node_id: str) -> Enrolment:
        if node_id not in self._enrolled:
            enrolled = self._enrolled[node_id] = enrol(
                self.plan.coordinator, node_id,
                os.environ.get("HORDE_COORDINATOR_REGISTRATION_TOKEN") or None)
            if enrolled.etcd is not None:
                sys.stderr.write(f"horderun: node {node_id} joins as etcd user "
                                 f"{enrolled.etcd.user}, issued by the job's coordinator\n")
        return self._enrolled[node_id]

    def _pinned_ca(self, url: str, enrolled: Enrolment) -> Path | None:
        """The job's etcd CA, from the coordinator's answer, checked against the join
        command's `--etcd-ca-sha256` and saved in the data folder; None where this node
        verifies etcd otherwise (its own HORDE_ETCD_CACERT, or the system's CAs)."""
        from rendezvous.etcd_tls import save_pinned_ca

        if not url.lower().startswith("https://") or EtcdTLS.from_env().cacert is not None:
            return None
        pin = self.plan.etcd_ca_sha256
        if pin is None:
            if enrolled.etcd_ca is None:
                return None
            raise RendezvousTLSError(
                "the job's coordinator sent etcd's CA, but nothing pins it: paste the owner's "
                "join command whole (its --etcd-ca-sha256), or give the CA file with "
                "--etcd-cacert")
        try:
            path = save_pinned_ca(enrolled.etcd_ca, pin, Path(self.plan.data_dir) / "etcd",
                                  self.plan.rdzv.job)
        except ValueError as exc:
            raise RendezvousTLSError(str(exc)) from None
        sys.stderr.write(f"horderun: etcd's CA from the job's coordinator matches the join "
                         f"command's SHA-256; saved in {path}\n")
        return path

    def _join_tls(self) -> EtcdTLS | None:
        """TLS settings with the pinned CA of a --join (None: from HORDE_ETCD_*)."""
        from rendezvous.etcd_tls import tls_with_ca

        return tls_with_ca(self._join_ca) if self._join_ca is not None else None

    def _node_id(self, index: int) -> str:
        prefix = self.plan.node_prefix or f"{self.plan.hostname}-{os.getpid()}"
        return f"{prefix}-{index}"

    def _use_embedded_tls(self) -> None:
        """With --etcd-tls: every etcd client of this process (coordinator included) and
        every worker it starts verifies the embedded etcd with its CA; without it, say
        that a non-loopback etcd is served in clear."""
        assert self._etcd is not None
        if self._etcd.ca_file is not None:
            os.environ["HORDE_ETCD_CACERT"] = str(self._etcd.ca_file)
        elif not _is_loopback(self.plan.listen_addr):
            logger.warning("the embedded etcd serves plain HTTP on %s (--no-etcd-tls): its "
                           "traffic (etcd passwords and tokens included) crosses the network "
                           "in clear; leave TLS on to protect it (docs/security.md)",
                           self._etcd.url)

    def _connect_with_auth(self, url: str) -> str:
        """Turn auth on in the embedded etcd; this launcher uses a control identity, its
        in-process coordinator the root one it needs to issue node users anyway (nothing
        goes into this process's environment: `elastic.run` returns to its caller)."""
        assert self._etcd is not None
        root_file = self._etcd.enable_auth(self.plan.rdzv.job, prefix=self.plan.rdzv.prefix)
        root = EtcdCredentials(ROOT_USER, root_file.read_text(encoding="utf-8"))
        self._root_file = root_file
        timeout = self.plan.rdzv.request_timeout(url)
        self._etcd_admin = EtcdAuthAdmin(backend_from_url(url, timeout=timeout,
                                                          credentials=root), self.keys)
        mine = self._etcd_admin.issue_control("launcher")
        self._backend = backend_from_url(url, timeout=timeout, credentials=mine)
        self._backend.get(self.keys.generation)
        sys.stderr.write(f"horderun: embedded etcd authentication on (root password in "
                         f"{root_file}); each worker gets its own control identity, each "
                         "--join its own node user from the coordinator (--no-etcd-auth: "
                         "off; docs/security.md)\n")
        sys.stderr.flush()
        return url

    def _where(self) -> str:
        """Which etcd member answers, when the rendezvous is a cluster of several."""
        endpoints = getattr(self._backend, "endpoints", ())
        if len(endpoints) < 2:
            return ""
        return (f" (etcd cluster of {len(endpoints)} members; using "
                f"{self._backend.endpoint.label}, failing over in the order listed)")  # type: ignore[union-attr]

    def _start_relay(self) -> None:
        """Serve the relay hub and a store for relay generations on the listen address,
        when the job is served beyond loopback (or relay_mode is "always"): members that
        accept no inbound connection then train through it (docs/nat.md)."""
        rdzv = self.plan.rdzv
        if rdzv.relay or rdzv.relay_mode == "never" or (
                _is_loopback(self.plan.listen_addr) and rdzv.relay_mode != "always"):
            return
        from elastic.core.relay import RelayHub
        from elastic.core.transport import serve_store

        self._relay = hub = RelayHub(self.plan.listen_addr)
        self._relay_store = store = serve_store(self.plan.listen_addr, rdzv.start_timeout)
        self.plan.rdzv = dataclasses.replace(rdzv, relay=hub.endpoint,
                                             relay_store_port=store.port)  # type: ignore[attr-defined]
        logger.info("relay for members behind NAT on %s (store port %d)", hub.endpoint,
                    store.port)  # type: ignore[attr-defined]

    def _publish_config(self) -> None:
        assert self._backend is not None
        # The robust rule travels with the job's settings: members that aggregate
        # differently would part their parameters.
        config = {"rendezvous": {**self.plan.rdzv.to_env(), "HORDE_ROBUST_AGGREGATION":
                                 str(self.plan.robust_aggregation)},
                  "HORDE_COORDINATOR": self._coordinator_url,
                  "HORDE_COLLECTIVE_TIMEOUT": str(self.plan.collective_timeout),
                  "HORDE_RESET_LIMIT": "" if self.plan.reset_limit is None
                  else str(self.plan.reset_limit)}
        if not self._backend.compare_and_swap(self.keys.config, 0, json.dumps(config).encode()):
            raise RendezvousError(
                f"job {self.plan.rdzv.job!r} already exists on this rendezvous; add workers to "
                "it with --join, or choose another --job name")

    def _joined_settings(self) -> dict[str, str]:
        assert self._backend is not None
        kv = self._backend.get(self.keys.config)
        if kv is None:
            raise RendezvousError(
                f"job {self.plan.rdzv.job!r} does not exist on this rendezvous; start it first "
                f"with horderun --job {self.plan.rdzv.job} ... (without --join)")
        try:
            config = records.parse_job_config(kv.value)
        except records.InvalidRecordError as exc:
            raise RendezvousError(
                f"job {self.plan.rdzv.job!r}: its settings on this rendezvous ({self.keys.config}) "
                f"cannot be used: {exc}. They are written by the horderun that started the job; "
                "ask its owner, or start a new job") from None
        env = dict(config["rendezvous"])
        env["HORDE_COLLECTIVE_TIMEOUT"] = config["HORDE_COLLECTIVE_TIMEOUT"]
        if config["HORDE_COORDINATOR"] and self.plan.coordinator == "embedded":
            env["HORDE_COORDINATOR"] = config["HORDE_COORDINATOR"]
        env["HORDE_RESET_LIMIT"] = config["HORDE_RESET_LIMIT"]
        return env

    def _worker_env(self, url: str, job_env: dict[str, str], index: int, node_id: str
                    ) -> dict[str, str]:
        plan = self.plan
        env = dict(os.environ)
        env.update(job_env)
        env.update({
            "HORDE_RENDEZVOUS": url,
            "HORDE_NODE_ID": node_id,
            "HORDE_ORDER": str(index),
            "HORDE_HOSTNAME": plan.hostname,
            "HORDE_ADVERTISE_ADDR": plan.advertise_addr,
            "HORDE_LOG_LEVEL": plan.log_level,
            "PYTHONUNBUFFERED": "1",
            "HORDE_COORDINATOR": job_env.get("HORDE_COORDINATOR", self._coordinator_url),
            # What horovodrun sets; ranks follow launch order in the first generation.
            "HOROVOD_RANK": str(index),
            "HOROVOD_SIZE": str(plan.np),
            "HOROVOD_LOCAL_RANK": str(index),
            "HOROVOD_LOCAL_SIZE": str(plan.np),
            "HOROVOD_CROSS_RANK": "0",
            "HOROVOD_CROSS_SIZE": "1",
            "HOROVOD_HOSTNAME": plan.hostname,
            "HOROVOD_CONTROLLER": "gloo",
            "HOROVOD_CPU_OPERATIONS": "gloo",
            "HOROVOD_GLOO_TIMEOUT_SECONDS": str(int(plan.collective_timeout)),
        })
        if plan.rdzv.elastic:
            env["HOROVOD_ELASTIC"] = "1"
        env["HORDE_TRUSTED_PEERS"] = "1" if plan.trusted_peers else "0"
        if self._etcd_admin is not None and self._etcd is not None:
            # The owner's own workers are trusted: a control identity each, never shared.
            creds = self._etcd_admin.issue_control(node_id)
            env.update(creds.to_env(self._etcd.data_dir / f"worker-{index}.password"))
            env.pop("HORDE_ETCD_PASSWORD", None)
        elif self._enrols():
            enrolled = self._enrolment(node_id)
            env["HORDE_COORDINATOR_TOKEN"] = enrolled.token
            if self._join_ca is not None:
                env["HORDE_ETCD_CACERT"] = str(self._join_ca)
            if enrolled.etcd is not None:
                folder = Path(plan.data_dir) / "etcd"
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                secret = folder / f"{node_id}.password"
                self._secret_files.append(secret)
                env.update(enrolled.etcd.to_env(secret))
        env.update(plan.extra_env)
        return env

    # -- workers ----------------------------------------------------------------------

    def _spawn_batch(self, count: int, url: str, job_env: dict[str, str]) -> None:
        """Start `count` workers as one launch batch: the leader admits them together."""
        batch = {"HORDE_BATCH": uuid.uuid4().hex[:12], "HORDE_BATCH_SIZE": str(count)}
        for _ in range(count):
            self._spawn(url, {**job_env, **batch})

    def _spawn(self, url: str, job_env: dict[str, str]) -> Worker:
        index = self._next_index
        self._next_index += 1
        node_id = self._node_id(index)
        out_path, err_path = output_paths(self.plan.output_filename, index,
                                          len(str(max(self.plan.np - 1, 1))))
        env = self._worker_env(url, job_env, index, node_id)
        self._mark_trusted(node_id)
        proc = subprocess.Popen(
            self.plan.command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only setsid and prctl
        )
        threads = [pump(proc.stdout, index, "stdout", None, out_path),  # type: ignore[arg-type]
                   pump(proc.stderr, index, "stderr", sys.stderr, err_path)]  # type: ignore[arg-type]
        worker = Worker(index, node_id, proc, threads)
        self.workers.append(worker)
        logger.info("started worker %d (node %s, pid %d)", index, node_id, proc.pid)
        return worker

    def _mark_trusted(self, node_id: str) -> None:
        """The owner's own workers are trusted: the leader ranks them first, so that the
        state a reset broadcasts from rank 0 comes from one of them while one holds it
        (`trusted/`, which only control identities may write). Not for a --join."""
        if self.plan.join or self._backend is None:
            return
        try:
            self._backend.put(self.keys.trusted_node(node_id), TRUSTED_MARK)
        except RendezvousError as exc:
            logger.warning("could not mark worker %s as trusted (%s): it is ranked by "
                           "admission order like a volunteer", node_id, exc)

    def _unmark_trusted(self) -> None:
        """Delete this launcher's trust marks from an etcd that outlives the job (the
        embedded one goes with it)."""
        if self.plan.join or self._backend is None or self._etcd is not None:
            return
        for worker in self.workers:
            try:
                self._backend.delete(self.keys.trusted_node(worker.node_id))
            except RendezvousError:
                return  # etcd gone (the embedded one stops with us): nothing to clean

    def _report_dead(self, worker: Worker) -> None:
        """Revoke a dead worker's lease so the leader replaces it without waiting."""
        if self._backend is None:
            return
        backend, own = self._backend, None
        enrolled = self._enrolled.get(worker.node_id)
        if enrolled is not None and enrolled.etcd is not None and backend is not None:
            # Only the node's own etcd user may revoke the lease its keys are attached to.
            url = self.plan.rendezvous_url or ""
            backend = own = backend_from_url(url, timeout=self.plan.rdzv.request_timeout(url),
                                             credentials=enrolled.etcd, tls=self._join_tls())
        try:
            kv = backend.get(self.keys.node(worker.node_id))
            if kv is not None:
                lease = NodeInfo.from_json(kv.value).lease
                if lease:
                    backend.revoke_lease(lease)
        except RendezvousError as exc:
            logger.warning("could not report the death of %s: %s", worker.node_id, exc)
        finally:
            if own is not None:
                own.close()

    def _terminate_all(self) -> None:
        live = [w for w in self.workers if w.proc.poll() is None]
        for w in live:
            _signal_group(w.proc, signal.SIGTERM)
        deadline = time.monotonic() + TERMINATE_GRACE
        for w in live:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(w.proc, signal.SIGKILL)
                w.proc.wait()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signal = signum
        self._stop.set()

    # -- main loop --------------------------------------------------------------------

    def _plan_coordinator(self, rendezvous_url: str) -> None:
        """Choose the coordinator URL now; an embedded one starts in the background.

        Workers get the URL at once and register with backoff, so starting the ledger
        (migrations, fsync) never delays the job.
        """
        choice = self.plan.coordinator
        if choice in ("", "none"):
            return
        if choice != "embedded":  # also for --join: the coordinator this node reports to
            self._coordinator_url = choice
            return
        if self.plan.join:
            return
        from rendezvous.embedded import free_port

        host = self.plan.listen_addr
        port = self.plan.coordinator_port or free_port(host)
        self._coordinator_url = f"http://{host}:{port}"
        if not _is_loopback(host):
            logger.warning("the embedded coordinator serves on %s: anyone who can reach it "
                           "sees the status page and can register nodes (credit is granted "
                           "only for rounds of the job's generations in etcd; see "
                           "docs/security.md)", self._coordinator_url)
        self._coordinator_thread = threading.Thread(
            target=self._start_coordinator, args=(rendezvous_url, port),
            name="horde-coordinator-start", daemon=True)
        self._coordinator_thread.start()

    def _start_coordinator(self, rendezvous_url: str, port: int) -> None:
        try:
            from coordinator.config import CoordinatorConfig
            from coordinator.server import EmbeddedCoordinator

            folder = self.plan.data_dir
            token_file = os.path.join(folder, "admin-token")
            token = _admin_token(folder, token_file)
            db = self.plan.coordinator_db or f"sqlite:///{self._own_ledger(folder)}"
            # With --etcd-auth the coordinator holds root (etcd lets only its role manage
            # users): volunteers fetch their own etcd users from it (docs/security.md).
            admin = {} if self._root_file is None else {
                "etcd_admin_user": ROOT_USER, "etcd_admin_password_file": str(self._root_file)}
            config = CoordinatorConfig(db_url=db, admin_token=token,
                                       rendezvous_url=rendezvous_url, job=self.plan.rdzv.job,
                                       rendezvous_prefix=self.plan.rdzv.prefix, **admin)
            self._coordinator = EmbeddedCoordinator(config, host=self.plan.listen_addr,
                                                    port=port)
            sys.stderr.write(f"horderun: status page {self._coordinator_url}/ (ledger {db}; "
                             f"admin token in {token_file}; past runs: horde-coordinator "
                             f"serve --db {db} --admin-token-file {token_file})\n")
            sys.stderr.flush()
        except Exception as exc:  # noqa: BLE001 - training goes on without credit
            sys.stderr.write(f"horderun: the embedded coordinator did not start: {exc}; "
                             "training goes on without the status page (set HORDE_DATA_DIR or "
                             "--data-dir to a writable folder, or --coordinator none)\n")

    def _own_ledger(self, folder: str) -> str:
        """The data folder's ledger.sqlite, locked for this run (one coordinator per SQLite
        file); while another `horderun` holds it, a ledger of this run's own beside it."""
        self._ledger_lock = _try_lock(os.path.join(folder, "ledger.lock"))
        if self._ledger_lock is not None:
            return os.path.join(folder, "ledger.sqlite")
        path = os.path.join(folder, f"ledger-{os.getpid()}.sqlite")
        sys.stderr.write(f"horderun: another horderun is using the ledger in {folder}; this "
                         f"run's credits go to {path} (give each job its own --data-dir)\n")
        return path

    def run(self) -> int:
        previous: dict[int, object] = {}
        try:
            url = self._connect()
            self._plan_coordinator(url)
            if self.plan.join:
                job_env = self._joined_settings()
            else:
                self._start_relay()
                self._publish_config()
                job_env = self.plan.rdzv.to_env()
                job_env["HORDE_COORDINATOR"] = self._coordinator_url
                job_env["HORDE_COLLECTIVE_TIMEOUT"] = str(self.plan.collective_timeout)
                job_env["HORDE_RESET_LIMIT"] = ("" if self.plan.reset_limit is None
                                                else str(self.plan.reset_limit))
                job_env["HORDE_ROBUST_AGGREGATION"] = str(self.plan.robust_aggregation)
            if self.plan.announce:
                self._announce(url)
            if threading.current_thread() is threading.main_thread():
                previous = {sig: signal.signal(sig, self._on_signal)
                            for sig in (signal.SIGINT, signal.SIGTERM)}
            self._spawn_batch(self.plan.np, url, job_env)
            return self._supervise(url, job_env)
        finally:
            self._terminate_all()
            for w in self.workers:
                for t in w.threads:
                    t.join(timeout=2)
            for secret in self._secret_files:  # its workers have ended: nothing reads it
                secret.unlink(missing_ok=True)
            if self._coordinator_thread is not None:
                self._coordinator_thread.join(30)
            if self._coordinator is not None:
                self._coordinator.stop()  # type: ignore[attr-defined]
            if self._relay is not None:
                self._relay.stop()  # type: ignore[attr-defined]
            self._relay_store = None
            if self._ledger_lock is not None:
                os.close(self._ledger_lock)  # releases the lock
            if self._backend is not None:
                self._unmark_trusted()
                self._backend.close()
            if self._etcd is not None:
                self._etcd.stop()
            for sig, handler in previous.items():  # elastic.run returns to its caller
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(sig, handler)  # type: ignore[arg-type]

    def _announce(self, url: str) -> None:
        from rendezvous.etcd_tls import fingerprint

        job = self.plan.rdzv.job
        join = ["horderun", "--join", "--rendezvous", url, "--job", job]
        ca_file = self._etcd.ca_file if self._etcd is not None else None
        # Our coordinator hands out the CA with each node's etcd user (auth on): the join
        # command pins it by fingerprint. Without auth, a joiner needs a copy of the file.
        ca_served = self._coordinator_thread is not None and self._etcd_admin is not None
        if ca_file is not None:
            join += (["--etcd-ca-sha256", fingerprint(ca_file)] if ca_served
                     else ["--etcd-cacert", str(ca_file)])
        if self._coordinator_thread is not None:  # ours: name it, as the job's settings do
            join += ["--coordinator", self._coordinator_url]
        join += ["-np", "1", *self.plan.command]
        sys.stderr.write(
            f"horderun: job {job} on rendezvous {url}"
            + (" (embedded etcd)" if self._etcd is not None else self._where()) + "\n"
            f"horderun: add workers with: {shlex.join(join)}\n")
        if ca_file is not None:
            how = ("a joining node gets it from the coordinator and checks it against the "
                   "join command's --etcd-ca-sha256; --status or --evict from elsewhere need "
                   "a copy (--etcd-cacert)" if ca_served else
                   "a machine joining from elsewhere needs a copy of it (check the "
                   "fingerprint after copying) at the path its --etcd-cacert names")
            sys.stderr.write(f"horderun: etcd serves TLS with the CA in {ca_file} (SHA-256 "
                             f"fingerprint {fingerprint(ca_file)}): {how}\n")
        if self._coordinator_url and self._coordinator_thread is None:
            urls = self._coordinator_url.split(",")
            sys.stderr.write(
                f"horderun: workers report credit to {urls[0]}"
                + (f" (then {', '.join(urls[1:])} if it fails)" if len(urls) > 1 else "")
                + "\n")
        sys.stderr.flush()

    def _supervise(self, url: str, job_env: dict[str, str]) -> int:
        next_discovery = time.monotonic() + self.plan.discovery_interval
        while not self._stop.is_set():
            for w in self.workers:
                if w.code is None and w.proc.poll() is not None:
                    w.code = w.proc.returncode
                    self._on_exit(w)
            if all(w.code is not None for w in self.workers):
                break
            if not self.plan.rdzv.elastic and any(w.code not in (None, 0) for w in self.workers):
                failed = next(w for w in self.workers if w.code not in (None, 0))
                sys.stderr.write(f"horderun: worker {failed.index} failed with exit code "
                                 f"{failed.code}; stopping the job\n")
                self._terminate_all()
                return _exit_code(failed.code)
            code = self._watch_stragglers()
            if code is not None:
                return code
            self._revoke_blacklisted()
            if self.plan.discovery_script and time.monotonic() >= next_discovery:
                next_discovery = time.monotonic() + self.plan.discovery_interval
                if not self._finished():
                    self._rediscover(url, job_env)
            self._stop.wait(_POLL)
        if self._signal is not None:
            sys.stderr.write("horderun: interrupted; stopping every worker\n")
            self._terminate_all()
            return 128 + self._signal
        return self._final_code()

    def _revoke_blacklisted(self) -> None:
        """With --etcd-auth: delete the etcd users of every node blacklisted now, so an
        evicted node cannot write again with the credentials it was given."""
        if self._etcd_admin is None or self._backend is None:
            return
        if time.monotonic() < self._next_revoke_check:
            return
        self._next_revoke_check = time.monotonic() + 1.0
        try:
            kvs, _ = self._backend.get_prefix(self.keys.blacklist)
        except RendezvousError as exc:
            logger.debug("blacklist not readable for revocation: %s", exc)
            return
        now = time.time()
        for kv in kvs:
            node_id = records.node_id_of(kv.key, self.keys.blacklist)
            entry = records.read_record(kv, records.parse_blacklist_entry)
            if node_id is None or entry is None or not entry.active(now):
                continue
            if node_id in self._revoked:
                continue
            self._revoked.add(node_id)
            try:
                control = f"horde-control-{self.keys.job}-{node_id}"
                gone = self._etcd_admin.revoke_user(control)
                gone = self._etcd_admin.revoke_node(node_id) or gone
            except (RendezvousError, ValueError) as exc:
                logger.warning("could not revoke the etcd credentials of blacklisted node "
                               "%s: %s", node_id, exc)
                continue
            if gone:
                sys.stderr.write(f"horderun: revoked the etcd credentials of blacklisted "
                                 f"node {node_id}\n")

    def _finished(self) -> bool:
        """True once the job is over, after which no worker may start: a worker of ours
        finished (exit 0, neither asked to leave nor leaving an elastic job: in Horovod one
        success ends the job) or the job's status is finished or failed."""
        if not self._job_over:
            done = self._first_finish[1] if self._first_finish is not None else None
            status = self._job_status() if done is None else None
            if done is not None or (status is not None and status.state != "running"):
                self._job_over = True
                logger.info("job %s is over (%s); starting no more workers", self.plan.rdzv.job,
                            f"worker {done.index} finished" if done is not None
                            else f"status {status.state}")  # type: ignore[union-attr]
        return self._job_over

    def _on_exit(self, w: Worker) -> None:
        if w.code == 0:
            logger.info("worker %d (%s) finished", w.index, w.node_id)
            if self._first_finish is None and not w.asked_to_leave and not self._left(w):
                self._first_finish = (time.monotonic(), w)
                self._next_report = time.monotonic() + self.plan.exit_report_interval
            return
        how = (f"was killed by signal {-w.code}" if w.code is not None and w.code < 0
               else f"exited with code {w.code}")
        sys.stderr.write(f"horderun: worker {w.index} ({w.node_id}) {how}\n")
        self._report_dead(w)

    def _left(self, w: Worker) -> bool:
        """Whether a worker that exited 0 left an elastic job (SIGTERM) rather than finished."""
        try:
            kv = self._backend.get(self.keys.leaving_node(w.node_id)) if self._backend else None
        except RendezvousError:
            return False
        return kv is not None and kv.value == b"left"

    def _watch_stragglers(self) -> int | None:
        """Once a worker has finished: say now and then which workers still run and what
        they wait on; past --exit-wait, stop them (exit code 1). None: keep waiting."""
        if self._first_finish is None:
            return None
        live = [w for w in self.workers if w.code is None]
        if not live:
            return None
        since, first = self._first_finish
        now = time.monotonic()
        wait = self.plan.exit_wait
        if wait is not None and now - since >= wait:
            sys.stderr.write(
                f"horderun: worker {first.index} finished {now - since:.0f} s ago and "
                f"--exit-wait is {wait:g} s; stopping the workers still running: "
                f"{self._straggler_report(live)}\n")
            sys.stderr.flush()
            self._terminate_all()
            return 1
        if self.plan.exit_report_interval > 0 and now >= self._next_report:
            self._next_report = now + self.plan.exit_report_interval
            sys.stderr.write(
                f"horderun: worker {first.index} finished {now - since:.0f} s ago; still "
                f"running: {self._straggler_report(live)}"
                + ("" if wait is not None else " (to bound this wait: --exit-wait SECONDS)")
                + "\n")
            sys.stderr.flush()
        return None

    def _straggler_report(self, live: list[Worker]) -> str:
        generation, records = None, {}
        try:
            generation = self.current_generation()
            if self._backend is not None:
                records = read_activity(self._backend, self.keys.activity)
        except RendezvousError as exc:
            logger.debug("could not read what the workers wait on: %s", exc)
        return describe_stragglers([(w.index, w.node_id) for w in live], generation, records,
                                   time.time())

    def _final_code(self) -> int:
        status = self._job_status()
        if status is not None and status.state == "failed":
            sys.stderr.write(f"horderun: job failed: {status.message}\n")
            return 1
        if self.plan.rdzv.elastic:
            if any(w.code == 0 for w in self.workers):
                if self._etcd is not None:
                    self._wait_for_joined_workers()
                return 0
            if self._etcd is not None and self._joined_workers():
                # This machine's workers died but the job goes on with workers that
                # joined it: the etcd, coordinator and relay served here are theirs too.
                sys.stderr.write(f"horderun: this machine's workers failed (exit codes "
                                 f"{[w.code for w in self.workers]}); the job goes on with "
                                 "the workers that joined it\n")
                self._wait_for_joined_workers()
                if self._signal is not None:
                    return 128 + self._signal
                if self._finished_by_a_member():
                    return 0
                sys.stderr.write("horderun: the joined workers left before the job finished\n")
                return 1
            codes = [w.code for w in self.workers]
            sys.stderr.write(f"horderun: no worker finished successfully (exit codes {codes})\n")
            return 1
        bad = [w for w in self.workers if w.code != 0]
        return _exit_code(bad[0].code) if bad else 0

    def _job_status(self) -> JobStatus | None:
        if self._backend is None:
            return None
        try:
            kv = self._backend.get(self.keys.status)
        except RendezvousError:
            return None
        return records.read_record(kv, records.parse_status) if kv else None

    def _finished_by_a_member(self) -> bool:
        """Whether the job ended well without this machine's workers: its status says
        finished, or a member of the last generation left as "finished" (the members can
        all be gone before the leader writes the status)."""
        status = self._job_status()
        if status is not None and status.state != "running":
            return status.state == "finished"
        try:
            generation = self.current_generation()
            if generation is None or self._backend is None:
                return False
            return any(kv is not None and kv.value == b"finished" for kv in (
                self._backend.get(self.keys.leaving_node(m.node_id))
                for m in generation.members))
        except RendezvousError:
            return False

    def _joined_workers(self) -> int:
        """How many workers (of any launcher) are registered with the job right now."""
        assert self._backend is not None
        try:
            kvs, _ = self._backend.get_prefix(self.keys.nodes)
        except RendezvousError:
            return 0
        return sum(1 for kv in kvs if registration(kv, self.keys) is not None)

    def _wait_for_joined_workers(self) -> None:
        """Keep the embedded etcd up while workers of other launchers still train; with
        etcd auth, also stand by to lead them (volunteers' node users may not)."""
        assert self._backend is not None
        standby = self._standby_leader()
        try:
            self._serve_joined_workers(standby)
        finally:
            if standby is not None:
                standby.stop()

    def _standby_leader(self) -> NodeAgent | None:
        """A leader-only agent under this launcher's control identity, not a member."""
        if self._etcd_admin is None or self._backend is None:
            return None
        info = NodeInfo(node_id=f"{self.plan.hostname}-{os.getpid()}-launcher",
                        host=self.plan.hostname, addr=self.plan.advertise_addr, store_port=0)
        agent = NodeAgent(self._backend, self.plan.rdzv, info, member=False)
        try:
            agent.start()
        except RendezvousError as exc:
            logger.warning("cannot stand by to lead the joined workers: %s", exc)
            return None
        sys.stderr.write("horderun: this launcher leads the joined workers' membership while "
                         "no trusted worker is left (their etcd users may not lead)\n")
        return agent

    def _serve_joined_workers(self, standby: NodeAgent | None) -> None:
        assert self._backend is not None
        announced = False
        while not self._stop.is_set():
            if standby is not None and standby.error is not None:
                logger.warning("the launcher's standby leader failed: %s", standby.error)
                standby = None
            kvs, _ = self._backend.get_prefix(self.keys.nodes)
            # Only live registrations count: a key bound to no lease (or not a registration)
            # would never go away and keep etcd up for good.
            kvs = [kv for kv in kvs if registration(kv, self.keys) is not None]
            if not kvs:
                return
            if not announced:
                sys.stderr.write(f"horderun: waiting for {len(kvs)} joined worker(s) to finish "
                                 "before stopping the embedded etcd\n")
                announced = True
            self._stop.wait(1.0)

    def _rediscover(self, url: str, job_env: dict[str, str]) -> None:
        try:
            found = hostlib.discover(self.plan.discovery_script or "", self.plan.slots_per_host)
        except ValueError as exc:
            logger.warning("%s", exc)
            return
        wanted, _remote = hostlib.local_slots(found)
        live = [w for w in self.workers if w.code is None and w.proc.poll() is None]
        missing = max(0, min(wanted, self.plan.rdzv.max_np) - len(live))
        if missing:
            self._spawn_batch(missing, url, job_env)
        for w in live[wanted:]:
            logger.info("host discovery removed a slot; asking worker %d to leave", w.index)
            w.asked_to_leave = True
            w.proc.send_signal(signal.SIGTERM)

    def current_generation(self) -> Generation | None:
        if self._backend is None:
            return None
        kv = self._backend.get(self.keys.generation)
        return records.read_record(kv, records.parse_generation) if kv else None


def describe_stragglers(workers: list[tuple[int, str]], generation: Generation | None,
                        records: dict[str, Activity], now: float) -> str:
    """`worker 0 (rank 0, node n-0): not in a collective; ...` for workers still running:
    the collective each waits in (records published by `elastic.core.stall`) and for how long."""
    parts = []
    for index, node_id in workers:
        rank = generation.rank_of(node_id) if generation is not None else None
        record = records.get(node_id)
        if record is not None and generation is not None and record.generation != generation.id:
            record = None
        doing = waited(record, now) if record is not None else "not in a collective"
        where = f"rank {rank}, " if rank is not None else ""
        parts.append(f"worker {index} ({where}node {node_id}): {doing}")
    return "; ".join(parts)


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_code(code: int | None) -> int:
    if code is None:
        return 1
    return 128 - code if code < 0 else code


def _admin_token(folder: str, token_file: str) -> str:
    """The embedded coordinator's admin token: the one kept in `token_file` from an earlier
    run, else a new one written there (mode 0600) in `folder` (created, mode 0700)."""
    import secrets

    os.makedirs(folder, mode=0o700, exist_ok=True)
    try:
        with open(token_file, encoding="utf-8") as handle:
            kept = handle.read().strip()
        if kept:
            return kept
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(24)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token


def _try_lock(path: str) -> int | None:
    """An exclusive lock on `path` (created, mode 0600) held until the descriptor is
    closed, or None while another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
