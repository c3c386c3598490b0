"""`--listen` / HORDE_LISTEN: where the embedded etcd and coordinator serve. An address
that is not this machine's gets a clear error naming the interfaces available."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from elastic.launcher.cli import UsageError, build_plan, make_parser
from tests.harness import horderun, repo_env

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "env_and_exit.py")
pytestmark = pytest.mark.timeout(60)


def plan(*flags: str) -> object:
    return build_plan(make_parser().parse_args([*flags, "-np", "1", sys.executable, SCRIPT]))


def test_default_serves_on_loopback_only() -> None:
    chosen = plan()
    assert (chosen.listen_addr, chosen.advertise_addr) == ("127.0.0.1", "127.0.0.1")


def test_an_interface_name_serves_on_its_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HORDE_LISTEN", raising=False)
    assert plan("--listen", "lo").listen_addr == "127.0.0.1"
    assert plan("--listen", "localhost").listen_addr == "127.0.0.1"
    assert plan("--network-interfaces", "lo").listen_addr == "127.0.0.1"
    monkeypatch.setenv("HORDE_LISTEN", "127.0.0.1")
    assert plan().listen_addr == "127.0.0.1"


@pytest.mark.parametrize(("flags", "env", "message"), [
    (["--listen", "203.0.113.77"], {}, "--listen 203.0.113.77: not an address of this machine"),
    ([], {"HORDE_LISTEN": "203.0.113.77"}, "HORDE_LISTEN 203.0.113.77: not an address"),
    (["--listen", "0.0.0.0"], {}, "needs the one address volunteers dial"),
    (["--listen", "::1"], {}, "only IPv4 addresses are supported"),
    (["--listen", "no-such-if0"], {}, "neither an IPv4 address nor an interface"),
    (["--network-interfaces", "no-such-if0"], {}, "no IPv4 address found on no-such-if0"),
])
def test_an_address_not_on_this_machine_is_refused(flags: list[str], env: dict[str, str],
                                                   message: str) -> None:
    result = horderun(*flags, "-np", "1", sys.executable, SCRIPT, env=repo_env(**env),
                      timeout=50)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "available: " in result.stderr and "lo 127.0.0.1" in result.stderr


def _public_address() -> str:
    """A non-loopback IPv4 address of this machine (skips the test where there is none)."""
    import socket

    import psutil

    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return addr.address
    pytest.skip("this machine has no non-loopback IPv4 address")


def test_tls_is_on_by_default_exactly_when_etcd_serves_beyond_loopback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HORDE_LISTEN", "HORDE_ETCD_TLS"):
        monkeypatch.delenv(name, raising=False)
    public = _public_address()
    assert plan().etcd_tls is False
    assert plan("--listen", "127.0.0.1").etcd_tls is False
    assert plan("--listen", public).etcd_tls is True
    assert plan("--listen", public, "--no-etcd-tls").etcd_tls is False
    assert plan("--etcd-tls").etcd_tls is True
    monkeypatch.setenv("HORDE_ETCD_TLS", "0")
    assert plan("--listen", public).etcd_tls is False
    monkeypatch.setenv("HORDE_ETCD_TLS", "maybe")
    with pytest.raises(UsageError, match="HORDE_ETCD_TLS"):
        plan("--listen", public)
    monkeypatch.delenv("HORDE_ETCD_TLS")
    # a job on an etcd of its own: TLS is the URL's business (https://)
    assert plan("--rendezvous", "etcd://127.0.0.1:2379", "--listen", public).etcd_tls is False


def test_etcd_auth_is_on_for_the_embedded_etcd_unless_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HORDE_ETCD_AUTH", raising=False)
    assert plan().etcd_auth is True
    assert plan("--no-etcd-auth").etcd_auth is False
    assert plan("--rendezvous", "etcd://127.0.0.1:2379").etcd_auth is False
    monkeypatch.setenv("HORDE_ETCD_AUTH", "off")
    assert plan().etcd_auth is False
    assert plan("--etcd-auth").etcd_auth is True  # the flag wins over the variable
    monkeypatch.setenv("HORDE_ETCD_AUTH", "sometimes")
    with pytest.raises(UsageError, match="HORDE_ETCD_AUTH='sometimes' must be 1 or 0"):
        plan()
