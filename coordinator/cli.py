"""`horde-coordinator`: serve the coordinator (waitress), migrate its ledger, or turn
etcd authentication on for a job.

    horde-coordinator serve --rendezvous etcd://127.0.0.1:2379 --job NAME \
        --db sqlite:///ledger.db --host 0.0.0.0 --port 8080 --admin-token-file admin.txt
    horde-coordinator migrate --db postgresql+psycopg://horde@db/horde
    horde-coordinator etcd-auth --rendezvous etcd://127.0.0.1:2379 --job NAME \
        --root-password-file /data/etcd-root.password

Every flag has a `HORDE_COORDINATOR_*` variable (e.g. HORDE_COORDINATOR_ADMIN_TOKEN);
a flag wins over the variable, which wins over the default. Prefer the variables or the
`*-file` flags for tokens: command lines are visible to every local user.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from coordinator.config import CoordinatorConfig
from rendezvous.errors import HordeError
from rendezvous.etcd_auth import ROOT_USER

logger = logging.getLogger("coordinator.cli")


def _read_secret(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"horde-coordinator: cannot read {path}: {exc.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="horde-coordinator", description="Credit ledger, REST API and status page "
                                              "for Horde jobs.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the API and the status page (waitress)")
    serve.add_argument("--db", dest="db_url", help="SQLAlchemy URL of the ledger "
                       "(default sqlite:///horde-coordinator.db)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    serve.add_argument("--threads", type=int, default=4, help="waitress worker threads")
    serve.add_argument("--rendezvous", dest="rendezvous_url",
                       help="etcd://HOST:PORT of the job's rendezvous, or the members of an "
                       "etcd cluster as etcd://H1:P1,H2:P2,H3:P3; https://... for etcd over "
                       "TLS, verified with HORDE_ETCD_CACERT (client certificate: "
                       "HORDE_ETCD_CERT / HORDE_ETCD_KEY; docs/security.md) (optional)")
    serve.add_argument("--job", help="the job to show and evict from (default: 'default')")
    serve.add_argument("--prefix", dest="rendezvous_prefix",
                       help="rendezvous key prefix (default horde)")
    serve.add_argument("--admin-token", help="bearer token for operator actions")
    serve.add_argument("--admin-token-file", help="read the admin token from this file")
    serve.add_argument("--registration-token",
                       help="if set, registering a node needs this bearer token")
    serve.add_argument("--registration-token-file",
                       help="read the registration token from this file")
    serve.add_argument("--half-life-days", type=float, help="RAC half-life (default 7)")
    serve.add_argument("--quorum", type=int, help="other reporters that must agree "
                       "(default 2)")
    serve.add_argument("--max-body-bytes", type=int, help="request body limit")
    serve.add_argument("--sqlite-synchronous", choices=["NORMAL", "FULL", "EXTRA"],
                       help="SQLite durability (default FULL)")
    serve.add_argument("--manifest-dir", help="serve this folder's signed job manifest and "
                       "files to volunteers (horde-volunteer manifest sign)")
    serve.add_argument("--port-file", help="write the bound port here once listening")
    serve.add_argument("--max-samples-per-round", type=int,
                       help="most samples one member may claim per round (default 2^20)")
    serve.add_argument("--max-span", type=int,
                       help="most rounds one report may cover (default 1024)")
    serve.add_argument("--trust-reported-membership", action="store_true", default=None,
                       help="let a quorum of reports establish a generation the rendezvous "
                       "never showed (a closed cluster of trusted nodes only; default: credit "
                       "only generations read from --rendezvous)")

    serve.add_argument("--etcd-admin-user",
                       help="etcd user with the root role (etcd lets only that role manage "
                       "users): nodes then fetch their own etcd credentials from the "
                       "coordinator and evictions revoke them (docs/security.md)")
    serve.add_argument("--etcd-admin-password-file",
                       help="file holding --etcd-admin-user's password (keep it 0600)")

    auth = sub.add_parser(
        "etcd-auth", help="turn etcd authentication on for a job (or check it is on); safe "
        "to run at every start",
        description="On an etcd without auth: write a random root password to "
        "--root-password-file (0600; an existing file is used, never replaced), create root "
        "and the job's control role, and enable auth. On an etcd with auth: check that the "
        "file's password authenticates as root and create the control role if missing.")
    auth.add_argument("--rendezvous", dest="rendezvous_url",
                      help="etcd://HOST:PORT, or etcd://H1:P1,H2:P2,H3:P3 for a cluster")
    auth.add_argument("--job", help="the job (default: 'default')")
    auth.add_argument("--prefix", dest="rendezvous_prefix",
                      help="rendezvous key prefix (default horde)")
    auth.add_argument("--root-password-file", dest="etcd_admin_password_file",
                      help="file holding etcd root's password, created when auth is turned "
                      "on; give it to `serve --etcd-admin-password-file` "
                      "(HORDE_COORDINATOR_ETCD_ADMIN_PASSWORD_FILE serves both)")
    auth.add_argument("--wait", type=float, default=30.0,
                      help="seconds to keep trying while etcd does not answer (default 30)")
    auth.add_argument("--issue-control", metavar="NAME",
                      help="also issue the trusted control identity horde-control-JOB-NAME "
                      "(for the job owner's horderun; replaces an earlier one of that name)")
    auth.add_argument("--out", help="with --issue-control: write its password here (0600)")

    migrate = sub.add_parser("migrate", help="upgrade the ledger's schema to the newest")
    migrate.add_argument("--db", dest="db_url", help="SQLAlchemy URL of the ledger")
    migrate.add_argument("--revision", default="head", help="target revision (default head)")
    return parser


def _config(args: argparse.Namespace) -> CoordinatorConfig:
    overrides = {"db_url": getattr(args, "db_url", None)}
    if args.command == "serve":
        overrides.update({
            "rendezvous_url": args.rendezvous_url, "job": args.job,
            "rendezvous_prefix": args.rendezvous_prefix,
            "admin_token": args.admin_token or _read_secret(args.admin_token_file),
            "registration_token": args.registration_token
            or _read_secret(args.registration_token_file),
            "half_life_days": args.half_life_days, "quorum": args.quorum,
            "max_body_bytes": args.max_body_bytes,
            "sqlite_synchronous": args.sqlite_synchronous,
            "max_samples_per_round": args.max_samples_per_round, "max_span": args.max_span,
            "trust_reported_membership": args.trust_reported_membership,
            "manifest_dir": args.manifest_dir,
            "etcd_admin_user": args.etcd_admin_user,
            "etcd_admin_password_file": args.etcd_admin_password_file,
        })
    elif args.command == "etcd-auth":
        overrides.update({
            "rendezvous_url": args.rendezvous_url, "job": args.job,
            "rendezvous_prefix": args.rendezvous_prefix,
            "etcd_admin_password_file": args.etcd_admin_password_file,
            "etcd_admin_user": ROOT_USER,  # etcd-auth sets up etcd's own root user
        })
        try:
            return CoordinatorConfig.from_env(**overrides)
        except ValueError as exc:
            if "etcd_admin" not in str(exc):
                raise
            raise ValueError("etcd-auth needs --rendezvous etcd://HOST:PORT and "
                             "--root-password-file PATH (or HORDE_COORDINATOR_RENDEZVOUS_URL "
                             "and HORDE_COORDINATOR_ETCD_ADMIN_PASSWORD_FILE)") from None
    return CoordinatorConfig.from_env(**overrides)


def _say_where(app: object) -> None:
    """Log the ledger and the rendezvous this coordinator uses (and which etcd member)."""
    from coordinator.state import EXTENSION

    st = app.extensions[EXTENSION]  # type: ignore[attr-defined]
    logger.info("ledger: %r (coordinators sharing this database serve the same ledger)",
                st.storage)
    if st.view is None:
        logger.info("rendezvous: none (no membership shown, no evictions)")
        return
    backend = st.view.backend
    try:
        backend.get(st.view.keys.generation)
    except Exception as exc:  # noqa: BLE001 - said, then the watcher keeps trying
        logger.warning("rendezvous %s not reachable now: %s", st.config.rendezvous_url, exc)
        return
    endpoints = getattr(backend, "endpoints", ())
    if len(endpoints) > 1:
        logger.info("rendezvous: etcd cluster %s; using member %s (failing over in order)",
                    st.config.rendezvous_url, backend.endpoint.label)
    else:
        logger.info("rendezvous: %s", st.config.rendezvous_url)


def _serve(config: CoordinatorConfig, args: argparse.Namespace) -> int:
    from coordinator.app import create_app
    from coordinator.server import make_server, server_url, shutdown_server
    from coordinator.state import EXTENSION

    app = create_app(config)
    server = make_server(app, args.host, args.port, args.threads)
    url = server_url(server)
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        Path(tmp).write_text(f"{int(server.effective_port)}\n")
        os.replace(tmp, args.port_file)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _stop)
    _say_where(app)
    logger.info("horde-coordinator serving at %s (status page %s/)", url, url)
    if config.admin_token is None:
        logger.info("no admin token: evictions through the API are disabled")
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        shutdown_server(server, loop_running=False)
        app.extensions[EXTENSION].close()
        logger.info("horde-coordinator stopped")
    return 0


def _etcd_auth(config: CoordinatorConfig, args: argparse.Namespace) -> int:
    """`horde-coordinator etcd-auth`: auth on (or checked) for the job, then optionally a
    control identity for the job owner's launcher. No password is ever logged or printed."""
    from rendezvous.etcd import EtcdBackend
    from rendezvous.etcd_auth import EtcdAuthAdmin, ensure_auth, write_secret
    from rendezvous.keys import JobKeys

    assert config.rendezvous_url and config.etcd_admin_password_file
    if (args.issue_control is None) != (args.out is None):
        raise ValueError("--issue-control NAME and --out FILE go together")
    if args.wait < 0:
        raise ValueError(f"--wait {args.wait:g} must be >= 0 seconds")
    keys = JobKeys(config.prefix, config.job or "default")
    root_file = Path(config.etcd_admin_password_file)
    setup = ensure_auth(config.rendezvous_url, keys, root_file, wait=args.wait)
    if setup.turned_on:
        logger.info("etcd at %s: authentication turned on for job %s; root password written "
                    "to %s (0600; keep it: it is the only copy)", setup.url, keys.job, root_file)
    if args.issue_control is None:
        return 0
    password = root_file.read_text(encoding="utf-8").strip()
    root = EtcdBackend.from_url(config.rendezvous_url, user=ROOT_USER, password=password)
    try:
        admin = EtcdAuthAdmin(root, keys)
        user = f"{admin.control_role}-{args.issue_control}"
        if admin.revoke_user(user):
            logger.info("etcd: replaced the earlier control identity %s", user)
        creds = admin.issue_control(args.issue_control)
        try:
            write_secret(Path(args.out), creds.password)
        except OSError as exc:
            admin.revoke_user(creds.user)
            raise ValueError(f"cannot write {args.out}: {exc.strerror}; the identity "
                             "was not kept") from None
    finally:
        root.close()
    logger.info("etcd: control identity %s issued; its password is in %s (0600)",
                creds.user, args.out)
    print(f"HORDE_ETCD_USER={creds.user}")
    print(f"HORDE_ETCD_PASSWORD_FILE={Path(args.out).resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        config = _config(args)
        if args.command == "migrate":
            from coordinator.storage import Storage

            storage = Storage(config.db_url)
            before = storage.current_revision()
            storage.upgrade(args.revision)
            logger.info("ledger %r migrated from %s to %s", storage, before or "empty",
                        storage.current_revision())
            storage.dispose()
            return 0
        if args.command == "etcd-auth":
            return _etcd_auth(config, args)
        return _serve(config, args)
    except (ValueError, HordeError) as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
