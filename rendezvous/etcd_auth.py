"""etcd authentication and per-node roles for a job's rendezvous (see docs/security.md).

With auth on, etcd checks every request against the roles of the user whose token it
carries. Horde uses three kinds of identity per job:

- `root` (etcd's own superuser): only the job owner's launcher holds it; it turns auth
  on and issues and revokes the other users.
- control identities (role `horde-control-<job>`): read and write the whole job prefix;
  the launcher, the coordinator and nodes the owner marks trusted.
- one user per node (`horde-node-<job>-<node>`, its own role): reads the job prefix
  and writes only that node's own keys (registration, activity, leaving flag, its
  readiness marker `ready/<node>`, which also carries its reset requests). Generation,
  leader, status, reset, config and blacklist stay out of its reach, and so do other
  nodes' keys; the trusted leader announces a reset a member asked for.

Revoking a node deletes its user and its role; etcd refuses its token from then on.
Credentials travel as `EtcdCredentials`, read from HORDE_ETCD_USER and
HORDE_ETCD_PASSWORD_FILE (or HORDE_ETCD_PASSWORD) in one place: `EtcdCredentials.from_env`.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rendezvous.etcd import EtcdBackend, _range_end
from rendezvous.etcd_tls import EtcdTLS
from rendezvous.keys import JobKeys

logger = logging.getLogger(__name__)

#: etcd's superuser name (etcd requires it to exist before `auth enable`).
ROOT_USER = "root"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
#: Node ids are validated by records.py; a user name derived from one must also stay short.
_MAX_USER = 200


def _b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class EtcdCredentials:
    """One etcd user name and its password (never logged: `repr` hides the password)."""

    user: str
    password: str

    def __post_init__(self) -> None:
        if not isinstance(self.user, str) or not self.user or len(self.user) > _MAX_USER:
            raise ValueError(f"etcd user name {self.user!r} must be 1-{_MAX_USER} characters")
        if not isinstance(self.password, str) or not self.password:
            raise ValueError(f"etcd user {self.user!r} needs a non-empty password")

    def __repr__(self) -> str:
        return f"EtcdCredentials(user={self.user!r}, password=<hidden>)"

    def to_env(self, password_file: Path | None = None) -> dict[str, str]:
        """HORDE_* variables that make `from_env` return these credentials: the password as a
        file (preferred, 0600) when `password_file` is given, else inline."""
        if password_file is None:
            return {"HORDE_ETCD_USER": self.user, "HORDE_ETCD_PASSWORD": self.password}
        write_secret(password_file, self.password)
        return {"HORDE_ETCD_USER": self.user, "HORDE_ETCD_PASSWORD_FILE": str(password_file)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EtcdCredentials | None:
        """Credentials from HORDE_ETCD_USER plus HORDE_ETCD_PASSWORD_FILE (a file holding the
        password) or HORDE_ETCD_PASSWORD; None when HORDE_ETCD_USER is unset (no auth)."""
        environ = os.environ if environ is None else environ
        user = environ.get("HORDE_ETCD_USER") or None
        if user is None:
            return None
        path = environ.get("HORDE_ETCD_PASSWORD_FILE") or None
        if path is not None:
            try:
                password = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(
                    f"HORDE_ETCD_PASSWORD_FILE={path!r} cannot be read ({exc}); point it at "
                    f"the file holding etcd user {user!r}'s password") from None
        else:
            password = environ.get("HORDE_ETCD_PASSWORD", "")
        if not password:
            raise ValueError(
                f"HORDE_ETCD_USER={user!r} is set but no password was given: set "
                "HORDE_ETCD_PASSWORD_FILE to a file holding it (or HORDE_ETCD_PASSWORD)")
        return cls(user, password)


def write_secret(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600, created that way)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


def new_password() -> str:
    """A random password (32 bytes of entropy, URL-safe)."""
    return secrets.token_urlsafe(32)


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} {name!r} is not usable as an etcd name: use letters, digits "
                         "and . _ : @ - (at most 128 characters, not starting with a symbol)")
    return name


class EtcdAuthAdmin:
    """Issues and revokes a job's etcd identities through the gateway's /auth API.

    `backend` must authenticate as root once auth is on (before: any client may call
    `enable`). Every call raises `RendezvousPermissionError` when etcd refuses it.
    """

    def __init__(self, backend: EtcdBackend, keys: JobKeys) -> None:
        self.backend = backend
        self.keys = keys
        _check_name("job name", keys.job)

    @property
    def control_role(self) -> str:
        return f"horde-control-{self.keys.job}"

    def node_user(self, node_id: str) -> str:
        return f"horde-node-{self.keys.job}-{_check_name('node id', node_id)}"

    def _call(self, op: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self.backend._post(op, path, payload)

    def _grant(self, role: str, key: str, perm: str, prefix: bool) -> None:
        body: dict[str, Any] = {"permType": perm, "key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(_range_end(key))
        self._call("auth_grant", "/auth/role/grant", {"name": role, "perm": body})

    def _exists(self, op: str, path: str, payload: dict[str, Any]) -> bool:
        from rendezvous.errors import RendezvousConnectionError, RendezvousError

        try:
            self._call(op, path, payload)
        except RendezvousError as exc:
            if "not found" in str(exc) and not isinstance(exc, RendezvousConnectionError):
                return False
            raise
        return True

    def enable(self, root_password: str) -> None:
        """Create `root` (with etcd's root role), the job's control role, and turn auth on.
        Call while auth is off; a `root` left by an earlier, interrupted call gets this
        password (with auth off anyone may change it anyway)."""
        if self._exists("auth_user_get", "/auth/user/get", {"name": ROOT_USER}):
            self._call("auth_user_changepw", "/auth/user/changepw",
                       {"name": ROOT_USER, "password": root_password})
        else:
            self._call("auth_user_add", "/auth/user/add",
                       {"name": ROOT_USER, "password": root_password})
        if not self._exists("auth_role_get", "/auth/role/get", {"role": "root"}):
            self._call("auth_role_add", "/auth/role/add", {"name": "root"})
        self._call("auth_user_grant", "/auth/user/grant", {"user": ROOT_USER, "role": "root"})
        self.ensure_control_role()
        self._call("auth_enable", "/auth/enable", {})
        logger.info("etcd: authentication on (root user created; job %s has control role %s)",
                    self.keys.job, self.control_role)

    def ensure_control_role(self) -> None:
        """The role that reads and writes the whole job prefix (trusted control identities)."""
        if not self._exists("auth_role_get", "/auth/role/get", {"role": self.control_role}):
            self._call("auth_role_add", "/auth/role/add", {"name": self.control_role})
        self._grant(self.control_role, self.keys.root, "READWRITE", prefix=True)

    def issue_control(self, name: str) -> EtcdCredentials:
        """A new trusted control identity (launcher, coordinator, trusted node)."""
        user = f"horde-control-{self.keys.job}-{_check_name('control name', name)}"
        creds = EtcdCredentials(user, new_password())
        self._add_user(creds, self.control_role)
        return creds

    def issue_node(self, node_id: str) -> EtcdCredentials:
        """A new user for one node: reads the job, writes only `node_id`'s own keys.
        Issuing again for the same node replaces its password (the old one stops working)."""
        user = self.node_user(node_id)
        self.revoke_node(node_id)
        self._call("auth_role_add", "/auth/role/add", {"name": user})
        keys = self.keys
        self._grant(user, keys.root, "READ", prefix=True)
        for key in (keys.node(node_id), keys.activity_node(node_id),
                    keys.leaving_node(node_id), keys.ready_node(node_id)):
            self._grant(user, key, "READWRITE", prefix=False)
        creds = EtcdCredentials(user, new_password())
        self._add_user(creds, user)
        return creds

    def _add_user(self, creds: EtcdCredentials, role: str) -> None:
        self._call("auth_user_add", "/auth/user/add",
                   {"name": creds.user, "password": creds.password})
        self._call("auth_user_grant", "/auth/user/grant", {"user": creds.user, "role": role})

    def revoke_node(self, node_id: str) -> bool:
        """Delete `node_id`'s user and role: etcd refuses its requests from now on (its
        token included). True if it had been issued."""
        user = self.node_user(node_id)
        had = self._exists("auth_user_delete", "/auth/user/delete", {"name": user})
        self._exists("auth_role_delete", "/auth/role/delete", {"role": user})
        if had:
            logger.warning("etcd: revoked credentials of node %s (user %s)", node_id, user)
        return had

    def revoke_user(self, user: str) -> bool:
        """Delete any user (a control identity the owner no longer trusts)."""
        return self._exists("auth_user_delete", "/auth/user/delete",
                            {"name": _check_name("etcd user", user)})


@dataclass(frozen=True)
class AuthSetup:
    """What `ensure_auth` found and did: `turned_on` is False when auth was on already."""

    url: str
    turned_on: bool
    root_password_file: Path
    control_role: str


def _auth_enabled(backend: EtcdBackend) -> bool:
    """Whether etcd checks credentials, asked without any (etcd answers /auth/status to
    anyone while auth is off and refuses an anonymous client once it is on)."""
    from rendezvous.errors import RendezvousPermissionError

    try:
        answer = backend._post("auth_status", "/auth/status", {})
    except RendezvousPermissionError as exc:
        if "user name is empty" in str(exc):
            return True
        raise
    return isinstance(answer, dict) and answer.get("enabled") is True


def _reach(backend: EtcdBackend, wait: float) -> bool:
    """`_auth_enabled`, retried while etcd cannot be reached for up to `wait` seconds (a
    container starts etcd and this command together)."""
    import time

    from rendezvous.errors import RendezvousConnectionError

    deadline = time.monotonic() + max(0.0, wait)
    while True:
        try:
            return _auth_enabled(backend)
        except RendezvousConnectionError as exc:
            if time.monotonic() >= deadline:
                raise RendezvousConnectionError(
                    f"{exc} (waited {wait:g} s for it; start etcd first, or check the "
                    "--rendezvous address)") from None
            logger.info("etcd at %s not answering yet; retrying", backend.url)
            time.sleep(0.5)


def _read_root_password(path: Path, url: str) -> str:
    from rendezvous.errors import RendezvousPermissionError

    try:
        password = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise RendezvousPermissionError(
            f"etcd at {url} has authentication on already, and the root password file "
            f"{path} does not exist: give the file written when auth was turned on (the "
            "coordinator image keeps it at /data/etcd-root.password)") from None
    except OSError as exc:
        raise RendezvousPermissionError(
            f"cannot read the root password file {path}: {exc.strerror}") from None
    if not password:
        raise RendezvousPermissionError(
            f"the root password file {path} is empty: it must hold etcd root's password "
            "(delete it only while etcd's auth is off, and a new one is made)")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is readable by others (mode %o): chmod 600 it", path,
                       stat.S_IMODE(mode))
    return password


def _create_secret(path: Path, text: str) -> bool:
    """Create `path` (0600) holding `text`; False when it exists already (never replaced)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return True


def ensure_auth(url: str, keys: JobKeys, root_password_file: Path, timeout: float = 5.0,
                wait: float = 0.0, tls: EtcdTLS | None = None) -> AuthSetup:
    """Make etcd at `url` run with auth for job `keys.job`; safe to repeat.

    Auth off: the root password is read from `root_password_file`, or a random one is
    written there first (0600; an existing file is never replaced), then `root`, the job's
    control role and `auth enable`. Auth on: the file must authenticate as root; the job's
    control role is created if missing. Raises `RendezvousPermissionError` (wrong or
    missing password) or `RendezvousConnectionError` (etcd unreachable for `wait` s).
    """
    from rendezvous.errors import RendezvousPermissionError

    path = Path(root_password_file)
    _check_name("job name", keys.job)
    anonymous = EtcdBackend.from_url(url, timeout=timeout, tls=tls)
    try:
        enabled = _reach(anonymous, wait)
        if not enabled:
            password = new_password()
            try:
                created = _create_secret(path, password)
            except OSError as exc:
                raise RendezvousPermissionError(
                    f"cannot write the root password file {path}: {exc.strerror}; give a "
                    "writable path (its folder must exist)") from None
            if not created:
                password = _read_root_password(path, url)
                logger.info("etcd at %s: auth is off; using the root password already in %s",
                            anonymous.url, path)
            admin = EtcdAuthAdmin(anonymous, keys)
            admin.enable(password)
            return AuthSetup(anonymous.url, True, path, admin.control_role)
    finally:
        anonymous.close()
    password = _read_root_password(path, url)
    root = EtcdBackend.from_url(url, timeout=timeout, user=ROOT_USER, password=password,
                                tls=tls)
    try:
        admin = EtcdAuthAdmin(root, keys)
        try:
            admin.ensure_control_role()
        except RendezvousPermissionError as exc:
            if "authentication failed" in str(exc):
                raise RendezvousPermissionError(
                    f"etcd at {root.url} has authentication on and refused the password in "
                    f"{path} for user root: that file does not hold this etcd's root "
                    "password. Give the file written when auth was turned on, or set a new "
                    "root password with `etcdctl --user root user passwd root` and write it "
                    "to that file (0600)") from None
            raise RendezvousPermissionError(
                f"etcd at {root.url}: user root authenticated but may not manage roles "
                f"({exc}); root must hold etcd's root role: `etcdctl --user root user "
                "grant-role root root`") from None
        logger.info("etcd at %s: authentication already on; root password in %s works; "
                    "control role %s ready", root.url, path, admin.control_role)
        return AuthSetup(root.url, False, path, admin.control_role)
    finally:
        root.close()
