"""The volunteer agent: joins a job, runs its worker(s) when the policy allows, reports.

    agent = Agent(settings); agent.run()     # what `horde-volunteer join` does

One agent per machine and job. It fetches the job's signed manifest from the coordinator,
checks it (owner key pinned at first join, every file and dependency by SHA-256),
registers this machine's node(s) with the coordinator (a token per node, kept in the
data folder), and then every `poll_seconds` reads the sensors, asks the policy, and
starts or stops one `horderun --join` launcher per device (a GPU, or the CPU). Stopping
is a graceful leave (SIGTERM: the node leaves at the next commit; its last rounds are
still reported); starting again is a join under the same node id, so credit adds up.

The agent answers on loopback HTTP (`agent.json` in the data folder holds its port and
a token only the volunteer's user can read): GET /status, POST /pause, /resume,
/confirm, /leave, /settings. `horde-volunteer status|pause|resume|leave|gui` use it.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import logging
import os
import platform
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import psutil

from elastic.coordinator_client import (
    CredentialsRefused,
    etcd_ca_from_answer,
    etcd_credentials_from_answer,
)
from rendezvous.etcd_auth import EtcdCredentials
from volunteer_client.manifest import (
    ENVELOPE_NAME,
    Manifest,
    ManifestError,
    PinStore,
    fingerprint,
    verify_envelope,
    verify_files,
    verify_requirements,
)
from volunteer_client.policy import RUNNING, Decision, Facts, PolicyEngine, UserChoice
from volunteer_client.settings import VolunteerSettings, split_job_url, with_changes

logger = logging.getLogger(__name__)

#: Seconds a launcher gets to make its workers leave before it is killed (the
#: launcher itself gives its workers 5 s after SIGTERM).
STOP_GRACE = 8.0
MAX_FILE_BYTES = 256 << 20
AGENT_FILE = "agent.json"


class AgentError(RuntimeError):
    """The agent cannot go on; the message says why and what to do."""


class SensorSource(Protocol):
    def read(self, own_pids: Any = ()) -> Facts: ...


# -- files in the data folder ------------------------------------------------------------

def _write_private(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def client_id(data_dir: Path) -> str:
    """This installation's stable id (`vol-` and 10 hex digits), made on first use."""
    path = data_dir / "identity.json"
    ident = _read_json(path).get("client_id")
    if isinstance(ident, str) and ident.startswith("vol-"):
        return ident
    ident = f"vol-{secrets.token_hex(5)}"
    _write_private(path, {"client_id": ident, "created": time.time()})
    return ident


def read_agent_file(data_dir: Path) -> dict[str, Any]:
    """Port and token of the running agent; AgentError if none runs."""
    info = _read_json(data_dir / AGENT_FILE)
    pid = info.get("pid")
    if not info or not isinstance(pid, int) or not psutil.pid_exists(pid):
        raise AgentError(f"no horde-volunteer agent is running (no live {data_dir / AGENT_FILE}"
                         "); start one with horde-volunteer join https://COORDINATOR/JOB")
    return info


def call_agent(data_dir: Path, method: str, path: str, body: dict[str, Any] | None = None,
               timeout: float = 10.0) -> dict[str, Any]:
    """One request to the running agent's loopback API."""
    info = read_agent_file(data_dir)
    request = urllib.request.Request(
        f"http://127.0.0.1:{int(info['port'])}{path}", method=method,
        data=json.dumps(body or {}).encode() if method == "POST" else None,
        headers={"Authorization": f"Bearer {info['token']}",
                 "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise AgentError(f"the agent refused {method} {path}: "
                         f"{exc.read().decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise AgentError(f"cannot reach the agent on port {info['port']}: {exc}") from None


# -- talking to the coordinator -------------------------------------------------------------

def _http(url: str, body: dict[str, Any] | None = None, token: str | None = None,
          limit: int = 1 << 20, timeout: float = 15.0) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body)
                                     .encode(), headers=headers,
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(limit + 1)
            if len(data) > limit:
                raise AgentError(f"{url} sent more than {limit} bytes; refusing it")
            return response.status, data
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(limit)
    except (urllib.error.URLError, OSError) as exc:
        raise AgentError(f"cannot reach the coordinator at {url}: {exc}") from None


@dataclass
class Slot:
    """One launcher: the worker of one device ("cpu" or "gpu0")."""

    device: str
    node_id: str
    proc: subprocess.Popen
    log_path: Path
    started: float
    stopping_since: float | None = None
    procs: dict[int, psutil.Process] = field(default_factory=dict)

    def tree(self) -> list[psutil.Process]:
        """The launcher and its descendants (cached, so cpu_percent has a baseline)."""
        try:
            root = psutil.Process(self.proc.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        for p in found:
            self.procs.setdefault(p.pid, p)
        alive = {p.pid for p in found}
        for pid in list(self.procs):
            if pid not in alive:
                del self.procs[pid]
        return list(self.procs.values())

    def cpu_percent(self) -> float:
        """CPU use of the whole process tree since the last call (100 = one core)."""
        total = 0.0
        for p in self.tree():
            try:
                total += p.cpu_percent(None)
            except psutil.Error:
                pass
        return total


def _die_with_agent() -> None:
    """In the launcher: own session, and SIGKILL when the agent dies (no orphan work)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


class Agent:
    """Runs one job for one volunteer (see the module docstring)."""

    def __init__(self, settings: VolunteerSettings, sensors: SensorSource | None = None,
                 confirm: bool = False) -> None:
        if not settings.coordinator:
            raise AgentError("no job given: horde-volunteer join https://COORDINATOR/JOB "
                             "(or coordinator = ... in the config file, or HORDE_COORDINATOR)")
        self.settings = settings
        self.base_url, self.job = split_job_url(settings.coordinator)
        self.data_dir = settings.data_path
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.client_id = client_id(self.data_dir)
        if sensors is None:
            from volunteer_client.sensors import Sensors

            sensors = Sensors()
        self.sensors = sensors
        self.policy = PolicyEngine(settings)
        self.pins = PinStore(self.data_dir / "pins")
        self.manifest: Manifest | None = None
        self.job_dir = self.data_dir / "jobs" / hashlib.sha256(
            settings.coordinator.encode()).hexdigest()[:16]
        self.slots: dict[str, Slot] = {}
        self.decision: Decision | None = None
        self.facts = Facts()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._confirm_now = confirm
        self.user_paused = False
        self.state = "starting"
        self.reason = ""
        self.crashes: collections.deque[float] = collections.deque()
        self._restart_at: dict[str, float] = {}
        self._control_token = secrets.token_urlsafe(24)
        self._server: ThreadingHTTPServer | None = None
        self._remote: dict[str, Any] = {}
        self._remote_at = 0.0
        self._finished = False
        self._backend: Any = None
        self._etcd_creds: dict[str, EtcdCredentials] = {}
        self._etcd_ca: Path | None = None  # the pinned CA of an https rendezvous
        self._evict_checked = 0.0
        self.exit_code = 0

    # -- preparing the job ---------------------------------------------------------------

    def fetch_and_verify(self) -> Manifest:
        """Fetch the signed manifest and the job's files; check all of it (or raise)."""
        job_url = f"{self.base_url}/{self.job}"
        status, raw = _http(f"{self.base_url}/api/v1/jobs/{self.job}/manifest")
        if status != 200:
            raise AgentError(f"the coordinator has no manifest for job {self.job} (HTTP "
                             f"{status}: {raw[:200].decode(errors='replace')})")
        try:
            envelope = json.loads(raw)
        except ValueError:
            raise ManifestError("the coordinator's manifest is not JSON") from None
        pinned = self.pins.get(job_url)
        manifest, public = verify_envelope(envelope, pinned)
        if manifest.job != self.job:
            raise ManifestError(f"the manifest is for job {manifest.job!r}, not {self.job!r}")
        if pinned is None:
            self.pins.pin(job_url, public)
            logger.warning("first join of %s: pinned the job owner's key %s (a different key "
                           "later is refused)", job_url, fingerprint(public))
        self.job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, digest in manifest.files.items():
            target = self.job_dir / name
            if target.is_file() and _sha256(target) == digest:
                continue
            quoted = urllib.parse.quote(name)
            status, data = _http(f"{self.base_url}/api/v1/jobs/{self.job}/files/{quoted}",
                                 limit=MAX_FILE_BYTES, timeout=120.0)
            if status != 200:
                raise AgentError(f"cannot download job file {name}: HTTP {status}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        verify_files(manifest, self.job_dir)
        verify_requirements(manifest)
        (self.job_dir / ENVELOPE_NAME).unlink(missing_ok=True)
        self.manifest = manifest
        return manifest

    def describe_job(self) -> str:
        """What will run and what the project can see: shown before the volunteer confirms."""
        m = self.manifest
        assert m is not None
        digest = hashlib.sha256(m.to_bytes()).hexdigest()[:16]
        return "\n".join([
            f"Job {m.job} from {self.base_url} (owner {m.owner or 'not named'}; key "
            f"{fingerprint(self.pins.get(f'{self.base_url}/{self.job}') or b'')})",
            f"  {m.description}" if m.description else "",
            f"  Runs: python {' '.join(m.entrypoint)} in {self.job_dir}",
            f"  Files ({len(m.files)}), each checked by SHA-256: {', '.join(sorted(m.files))}",
            "  Python packages pinned: " + (", ".join(f"{k} {v['version']}" for k, v in
                                                  m.requirements.items()) or "none"),
            f"  Manifest digest {digest}",
            "  The job runs as your user, with a minimal environment, HOME and TMPDIR in its",
            "  own folder. It is not sandboxed: it can read what your user can read; use the",
            "  container image (docs/volunteer.md) to keep it away from your files.",
            "  The project sees: this machine's CPU and GPU model, core count and GPU memory,",
            f"  the node id {self.client_id}-*, the display name you set, your IP address",
            "  (to the coordinator and the other members), and the work your node does.",
            "  It does not see your files, other programs, your user name or your settings.",
        ]).replace("\n\n", "\n")

    def _confirmed(self) -> bool:
        record = _read_json(self.data_dir / "confirmed.json")
        m = self.manifest
        return m is not None and record.get(self.settings.coordinator) == hashlib.sha256(
            m.to_bytes()).hexdigest()

    def confirm(self) -> None:
        """The volunteer agreed to run this manifest (a new manifest asks again)."""
        assert self.manifest is not None
        path = self.data_dir / "confirmed.json"
        record = _read_json(path)
        record[self.settings.coordinator] = hashlib.sha256(self.manifest.to_bytes()).hexdigest()
        _write_private(path, record)
        logger.info("job %s confirmed", self.job)
        self._wake.set()

    # -- nodes and credentials ------------------------------------------------------------

    def node_id(self, device: str) -> str:
        """The node id a device's worker registers under (launcher adds `-0`)."""
        return f"{self.client_id}-{device}-0"

    def _token(self, node_id: str) -> str:
        """The coordinator token of `node_id`, registering it on first use."""
        path = self.data_dir / "credentials.json"
        creds = _read_json(path)
        key = f"{self.base_url}|{node_id}"
        if isinstance(creds.get(key), str):
            return creds[key]
        hardware = self._hardware(node_id)
        secret = None
        if self.settings.registration_token_file:
            try:
                secret = Path(self.settings.registration_token_file).read_text().strip()
            except OSError as exc:
                raise AgentError(f"cannot read the registration token file "
                                 f"{self.settings.registration_token_file}: {exc}") from None
        status, raw = _http(f"{self.base_url}/api/v1/nodes", {
            "node_id": node_id, "display_name": self.settings.display_name or node_id,
            "owner": self.client_id, "hardware": hardware}, token=secret)
        if status != 201:
            raise AgentError(f"the coordinator refused to register node {node_id} (HTTP "
                             f"{status}: {raw[:300].decode(errors='replace')})")
        token = json.loads(raw)["token"]
        creds[key] = token
        _write_private(path, creds)
        return token

    def _etcd_env(self, node_id: str, token: str) -> dict[str, str]:
        """The worker's own etcd identity, fetched fresh from the coordinator (each fetch
        replaces the last password): HORDE_ETCD_USER plus a 0600 password file in the
        data folder. Empty when the job runs without etcd authentication."""
        status, raw = _http(f"{self.base_url}/api/v1/nodes/{node_id}/etcd-credentials", {},
                            token=token)
        try:
            creds = etcd_credentials_from_answer(status, raw, node_id)
        except CredentialsRefused as exc:
            raise AgentError(str(exc)) from None
        if creds is None:
            return {}
        folder = self.data_dir / "etcd"
        folder.mkdir(exist_ok=True, mode=0o700)
        self._pin_etcd_ca(etcd_ca_from_answer(raw), folder)
        self._etcd_creds[node_id] = creds
        if self._backend is not None:  # it may hold a password this fetch replaced
            self._backend.close()
            self._backend = None
        logger.info("node %s uses etcd user %s", node_id, creds.user)
        return creds.to_env(folder / f"{node_id}.password")

    def _pin_etcd_ca(self, pem: str | None, folder: Path) -> None:
        """Keep the CA the coordinator sent for an https rendezvous, if the signed manifest
        pins it (its SHA-256); the volunteer's own HORDE_ETCD_CACERT wins."""
        from rendezvous.etcd_tls import EtcdTLS, save_pinned_ca

        m = self.manifest
        if m is None or not m.etcd_ca_sha256 or EtcdTLS.from_env().cacert is not None:
            return
        try:
            self._etcd_ca = save_pinned_ca(pem, m.etcd_ca_sha256, folder, m.job,
                                           pinned_by="the signed manifest")
        except ValueError as exc:
            raise AgentError(str(exc)) from None

    def _hardware(self, node_id: str) -> dict[str, Any]:
        """What the project learns about the device (docs/volunteer.md says the same)."""
        info: dict[str, Any] = {"cpu": (platform.processor() or platform.machine())[:100],
                                "cpus": psutil.cpu_count() or 0}
        device = node_id[len(self.client_id) + 1:-2]
        for gpu in self.facts.gpus:
            if device == f"gpu{gpu.index}":
                info.update(gpu=gpu.name[:100], gpu_memory_gb=round(gpu.memory_total / 2**30, 1))
        return info

    # -- workers ---------------------------------------------------------------------------

    def _worker_env(self, device: str, token: str,
                    etcd: dict[str, str] | None = None) -> dict[str, str]:
        """A minimal environment: no variable of the volunteer's session leaks in."""
        home = self.job_dir / ".home"
        tmp = self.job_dir / ".tmp"
        home.mkdir(exist_ok=True, mode=0o700)
        tmp.mkdir(exist_ok=True, mode=0o700)
        env = {
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"]),
            "HOME": str(home), "TMPDIR": str(tmp), "LANG": "C.UTF-8",
            "HORDE_COORDINATOR_TOKEN": token,
            "HORDE_CPU_THREADS": str(self.settings.cpu_threads),
            "OMP_NUM_THREADS": str(self.settings.cpu_threads),
            "CUDA_VISIBLE_DEVICES": device[3:] if device.startswith("gpu") else "",
            "HORDE_GPU_MEMORY_FRACTION": str(self.settings.gpu_memory_fraction),
            **(etcd or {}),
        }
        for name in ("PYTHONPATH", "LD_LIBRARY_PATH", "HORDE_LOG_LEVEL"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        # TLS to an https:// rendezvous: the CA (and client certificate) the volunteer set
        from rendezvous.etcd_tls import EtcdTLS

        env.update(EtcdTLS.from_env().to_env())
        if self._etcd_ca is not None and "HORDE_ETCD_CACERT" not in env:
            env["HORDE_ETCD_CACERT"] = str(self._etcd_ca)  # pinned by the signed manifest
        return env

    def _start(self, device: str) -> None:
        m = self.manifest
        assert m is not None
        node_id = self.node_id(device)
        token = self._token(node_id)
        etcd = self._etcd_env(node_id, token)
        prefix = node_id[:-2]
        command = [sys.executable, "-m", "elastic.launcher.cli", "--join",
                   "--rendezvous", m.rendezvous, "--job", m.job, "-np", "1",
                   "--node-id-prefix", prefix, "--coordinator", self.base_url,
                   "--", sys.executable, "-m", "volunteer_client.worker_shim",
                   *m.entrypoint]
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"{device}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                command, cwd=self.job_dir, env=self._worker_env(device, token, etcd),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_agent)  # noqa: PLW1509 - only setsid and prctl
        self.slots[device] = Slot(device, node_id, proc, log_path, time.time())
        logger.info("started the worker on %s (node %s, pid %d)", device, node_id, proc.pid)

    def _stop_slot(self, slot: Slot, reason: str) -> None:
        if slot.stopping_since is None and slot.proc.poll() is None:
            logger.info("stopping the worker on %s: %s", slot.device, reason)
            slot.stopping_since = time.monotonic()
            try:
                os.killpg(slot.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        """Notice ended launchers: asked to stop, finished, evicted or crashed."""
        for device, slot in list(self.slots.items()):
            code = slot.proc.poll()
            if code is None:
                if (slot.stopping_since is not None
                        and time.monotonic() - slot.stopping_since > STOP_GRACE):
                    logger.warning("worker on %s ignored the stop; killing it", device)
                    try:
                        os.killpg(slot.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                continue
            del self.slots[device]
            if slot.stopping_since is not None:
                logger.info("worker on %s stopped (exit code %s)", device, code)
                continue
            tail = _tail(slot.log_path)
            if code == 0:
                logger.info("worker on %s finished: the job is over", device)
                self._finished = True
                continue
            if "blacklisted" in tail:
                line = next((s for s in reversed(tail.splitlines()) if "blacklisted" in s), "")
                self._fail("evicted", f"the job evicted this node: {line.strip()[-300:]}")
                continue
            self._on_crash(device, code, slot.log_path)

    def _on_crash(self, device: str, code: int, log_path: Path) -> None:
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > self.settings.restart_window_seconds:
            self.crashes.popleft()
        if len(self.crashes) > self.settings.max_restarts:
            self._fail("stopped", f"the worker crashed {len(self.crashes)} times within "
                       f"{self.settings.restart_window_seconds:g} s (last exit code {code}); "
                       f"not restarting it. See {log_path}")
            return
        delay = min(self.settings.restart_backoff_seconds * 2 ** (len(self.crashes) - 1), 300)
        self._restart_at[device] = now + delay
        logger.warning("worker on %s crashed (exit code %s); restarting in %.0f s (crash %d "
                       "of %d allowed); log: %s", device, code, delay, len(self.crashes),
                       self.settings.max_restarts, log_path)

    def _fail(self, state: str, reason: str) -> None:
        logger.error("%s", reason)
        self.state, self.reason = state, reason
        self.exit_code = 3
        self._stop.set()

    def own_pids(self) -> list[int]:
        """Pids of every launcher and worker process this agent started."""
        return [p.pid for s in self.slots.values() for p in s.tree()]

    def step(self) -> Decision:
        """One poll: sensors -> policy -> start/stop workers."""
        with self._lock:
            self._reap()
            self._check_eviction()
            if self._stop.is_set():
                return self.decision or Decision("paused")
            self.facts = self.sensors.read(self.own_pids())
            user = UserChoice(confirmed=self._confirmed(), paused=self.user_paused)
            decision = self.policy.step(datetime.now(), self.facts, user)
            self.decision = decision
            wanted = ({f"gpu{i}" for i in decision.gpus} | ({"cpu"} if decision.cpu else set())
                      if decision.state == RUNNING else set())
            for device, slot in list(self.slots.items()):
                if device not in wanted:
                    self._stop_slot(slot, decision.describe())
            now = time.monotonic()
            for device in sorted(wanted - set(self.slots)):
                if self._restart_at.get(device, 0.0) > now or self._finished:
                    continue
                self._start(device)
            if self._finished and not self.slots:
                self.state, self.reason = "finished", "the job is over"
                self._stop.set()
            elif decision.state != RUNNING:
                self.state = "paused"
                self.reason = "; ".join(decision.reasons)
            elif not self.slots:
                self.state, self.reason = "waiting", "restarting the worker after a crash"
            else:
                self.state, self.reason = "running", ""
            return decision

    # -- status ---------------------------------------------------------------------------

    def _rendezvous(self) -> Any:
        """A read-only handle on the job's etcd (opened once)."""
        if self._backend is None and self.manifest is not None:
            from rendezvous import backend_from_url

            # with etcd auth on, read as one of this machine's nodes (reads the job)
            creds = next(iter(self._etcd_creds.values()), None)
            from rendezvous.etcd_tls import tls_with_ca

            tls = tls_with_ca(self._etcd_ca) if self._etcd_ca is not None else None
            self._backend = backend_from_url(self.manifest.rendezvous, timeout=2.0,
                                             credentials=creds, tls=tls)
        return self._backend

    def _check_eviction(self) -> None:
        """Stop for good when the job blacklisted one of this machine's nodes.

        A blacklisted worker is dropped from the next generation but may live on; the
        agent reads the blacklist itself, stops the worker and says why."""
        if not self.slots or time.monotonic() - self._evict_checked < 2.0:
            return
        self._evict_checked = time.monotonic()
        from rendezvous.errors import RendezvousError
        from rendezvous.generation import BlacklistEntry
        from rendezvous.keys import JobKeys
        from rendezvous.settings import DEFAULT_PREFIX

        keys = JobKeys(DEFAULT_PREFIX, self.job)
        for slot in list(self.slots.values()):
            try:
                kv = self._rendezvous().get(keys.blacklisted(slot.node_id))
                entry = BlacklistEntry.from_json(kv.value) if kv is not None else None
            except (RendezvousError, ValueError, TypeError, KeyError) as exc:
                logger.debug("cannot read the blacklist: %s", exc)
                continue
            if entry is not None and entry.active(time.time()):
                until = ("for good" if entry.until == float("inf")
                         else f"until {time.ctime(entry.until)}")
                self._fail("evicted", f"the job evicted this node ({slot.node_id}) {until}: "
                           f"{str(entry.reason)[:300]}")
                for other in list(self.slots.values()):
                    self._stop_slot(other, "evicted")
                return

    def _membership(self) -> dict[str, Any]:
        """Generation and rank of this machine's nodes, from the rendezvous."""
        if self.manifest is None or not self.slots:
            return {}
        try:
            from rendezvous.generation import Generation
            from rendezvous.keys import JobKeys
            from rendezvous.settings import DEFAULT_PREFIX

            kv = self._rendezvous().get(JobKeys(DEFAULT_PREFIX, self.job).generation)
            if kv is None:
                return {}
            gen = Generation.from_json(kv.value)
            ranks = {s.node_id: gen.rank_of(s.node_id) for s in self.slots.values()}
            return {"generation": gen.id, "world_size": len(gen.members), "ranks": ranks}
        except Exception as exc:  # noqa: BLE001 - status must not fail on a bad etcd value
            logger.debug("cannot read the generation: %s", exc)
            return {}

    def _credit(self) -> dict[str, Any]:
        """Credit and samples of this machine's nodes, from the coordinator (every 5 s)."""
        if time.monotonic() - self._remote_at < 5.0:
            return self._remote
        total = {"credit": 0, "rac": 0.0, "contributions_accepted": 0, "nodes": {}}
        creds = _read_json(self.data_dir / "credentials.json")
        for key in creds:
            base, _, node_id = key.partition("|")
            if base != self.base_url:
                continue
            try:
                status, raw = _http(f"{self.base_url}/api/v1/nodes/{node_id}", timeout=3.0)
                item = json.loads(raw) if status == 200 else None
            except (AgentError, ValueError):
                item = None
            if not isinstance(item, dict):
                continue
            credit = item.get("credit")
            rac = item.get("rac")
            if isinstance(credit, int) and isinstance(rac, (int, float)):
                total["credit"] += credit
                total["rac"] += float(rac)
                total["contributions_accepted"] += int(item.get("contributions_accepted") or 0)
                total["nodes"][node_id] = {"credit": credit, "rac": rac}
        self._remote, self._remote_at = total, time.monotonic()
        return total

    def status(self) -> dict[str, Any]:
        """Everything `horde-volunteer status` and the GUI show."""
        with self._lock:
            slots = list(self.slots.values())
            decision = self.decision
            facts = self.facts
            state = self.state
            if state == "running":
                member = self._membership()
                in_gen = any(r is not None for r in member.get("ranks", {}).values())
                state = "training" if in_gen else "waiting"
                reason = "" if in_gen else "waiting to be admitted to the next generation"
            else:
                member, reason = {}, self.reason
            used = set(decision.gpus) if decision else set()
            return {
                "state": state, "reason": reason, "job": self.job,
                "coordinator": self.base_url, "client_id": self.client_id,
                "confirmed": self._confirmed(), "user_paused": self.user_paused,
                "generation": member.get("generation"), "world_size": member.get("world_size"),
                "ranks": member.get("ranks", {}),
                "devices": [s.device for s in slots],
                "cpu_percent": round(sum(s.cpu_percent() for s in slots), 1),
                "worker_pids": [p.pid for s in slots for p in s.tree()],
                "gpus": [{"index": g.index, "name": g.name, "temp_c": g.temp_c,
                          "memory_used": g.memory_used, "memory_total": g.memory_total,
                          "utilization": g.utilization, "used": g.index in used}
                         for g in facts.gpus],
                "notes": list(decision.notes) if decision else [],
                "crashes": len(self.crashes),
                "settings": {k: v for k, v in self.settings.__dict__.items()
                             if k != "windows"},
                **self._credit(),
            }

    # -- control API ----------------------------------------------------------------------

    # Actions only set flags and wake the main loop: workers must be started by the main
    # thread (the launcher dies with the thread that started it: PR_SET_PDEATHSIG).

    def pause(self) -> None:
        """The volunteer paused: workers leave at the next poll (woken at once)."""
        self.user_paused = True
        self._wake.set()

    def resume(self) -> None:
        """The volunteer resumed: workers join again at the next poll (woken at once)."""
        self.user_paused = False
        self._wake.set()

    def update_settings(self, changes: dict[str, Any]) -> None:
        """Change settings while running (the GUI); they apply at the next poll."""
        with self._lock:
            self.settings = with_changes(self.settings, **changes)
            self.policy.settings = self.settings
        self._wake.set()

    def leave(self) -> None:
        """Leave the job gracefully and stop the agent."""
        self.state, self.reason = "left", "left the job"
        self._stop.set()
        self._wake.set()

    def _serve_control(self) -> None:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("control: " + fmt, *args)

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                given = self.headers.get("Authorization", "")
                if secrets.compare_digest(given, f"Bearer {agent._control_token}"):
                    return True
                self._answer(401, {"error": "missing or wrong control token (it is in "
                                            f"{agent.data_dir / AGENT_FILE})"})
                return False

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if not self._authorised():
                    return
                if self.path == "/status":
                    self._answer(200, agent.status())
                else:
                    self._answer(404, {"error": f"no {self.path}"})

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorised():
                    return
                length = min(int(self.headers.get("Content-Length") or 0), 65536)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    self._answer(400, {"error": "body is not JSON"})
                    return
                actions = {"/pause": agent.pause, "/resume": agent.resume,
                           "/leave": agent.leave, "/confirm": agent.confirm}
                try:
                    if self.path in actions:
                        actions[self.path]()
                    elif self.path == "/settings" and isinstance(body, dict):
                        agent.update_settings(body)
                    else:
                        self._answer(404, {"error": f"no {self.path}"})
                        return
                except (ValueError, TypeError) as exc:
                    self._answer(422, {"error": str(exc)})
                    return
                self._answer(200, {"ok": True, "state": agent.state})

        self._server = ThreadingHTTPServer(("127.0.0.1", self.settings.control_port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="horde-volunteer-control",
                         daemon=True).start()
        _write_private(self.data_dir / AGENT_FILE, {
            "port": self._server.server_address[1], "token": self._control_token,
            "pid": os.getpid(), "job": self.settings.coordinator})

    # -- main loop ------------------------------------------------------------------------

    def run(self, announce: Any = None) -> int:
        """Prepare the job, then poll until the volunteer leaves or the job ends."""
        say = announce or (lambda text: logger.warning("%s", text))
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, lambda *_: self.leave())
                        for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.fetch_and_verify()
            if self._confirm_now and not self._confirmed():
                self.confirm()
            if not self._confirmed():
                say(self.describe_job() + "\nPaused until you confirm: horde-volunteer "
                    "confirm (or the GUI's Confirm button).")
            self._serve_control()
            while not self._stop.is_set():
                self.step()
                self._wake.wait(self.settings.poll_seconds)
                self._wake.clear()
            return self.exit_code
        except ManifestError as exc:
            self.state, self.reason = "refused", str(exc)
            say(f"horde-volunteer: refusing job {self.job}: {exc}")
            return 4
        except AgentError as exc:
            self.state, self.reason = "stopped", str(exc)
            say(f"horde-volunteer: {exc}")
            return 3
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def shutdown(self) -> None:
        """Graceful leave of every worker, then close the control API."""
        with self._lock:
            for slot in list(self.slots.values()):
                self._stop_slot(slot, self.reason or "the agent stops")
        deadline = time.monotonic() + STOP_GRACE + 2
        while self.slots and time.monotonic() < deadline:
            with self._lock:
                self._reap()
            time.sleep(0.1)
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            info = _read_json(self.data_dir / AGENT_FILE)
            if info.get("pid") == os.getpid():
                (self.data_dir / AGENT_FILE).unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    from volunteer_client.manifest import sha256_file

    return sha256_file(path)


def _tail(path: Path, size: int = 4096) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""

