"""`horderun`: horovodrun's flags, on Horde's etcd rendezvous.

    horderun -np 4 python train.py                          # embedded etcd, 4 workers
    horderun -np 2 --min-np 1 --max-np 4 python train.py    # elastic
    horderun --join --rendezvous etcd://HOST:PORT --job NAME -np 1 python train.py

Settings resolve in one place (`build_plan`): a flag wins over its `HORDE_*`
environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Sequence

from elastic import __version__ as VERSION
from elastic.launcher import hosts as hostlib
from elastic.launcher.launch import Launcher, LaunchPlan
from rendezvous.errors import HordeError
from rendezvous.settings import RendezvousSettings

logger = logging.getLogger("elastic.launcher")

#: Schemes `--rendezvous` takes (etcd's v3 API over its HTTP gateway).
RENDEZVOUS_SCHEMES = ("etcd", "http", "https")


LOG_LEVELS = ["TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "FATAL"]


class UsageError(ValueError):
    """Flags that cannot work together; reported with exit code 2."""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="horderun",
        description="Launch a Horovod-style training script on an elastic etcd rendezvous. "
                    "Without --rendezvous an embedded etcd is started and stopped with the job.",
        epilog="Add workers to a running job from any machine with: horderun --join "
               "--rendezvous etcd://HOST:PORT --job NAME -np N python train.py. "
               "Evict a node: horderun --evict NODE_ID --rendezvous ... --job NAME.",
        allow_abbrev=False,
    )
    parser.add_argument("-v", "--version", action="version", version=f"horderun {VERSION}")
    parser.add_argument("-np", "--num-proc", dest="np", type=int,
                        help="number of workers to start on this machine")
    parser.add_argument("--min-np", "--min-num-proc", dest="min_np", type=int,
                        help="elastic: smallest world the job may shrink to")
    parser.add_argument("--max-np", "--max-num-proc", dest="max_np", type=int,
                        help="elastic: largest world the job may grow to")
    parser.add_argument("-H", "--hosts", help="HOST:SLOTS[,...]; only this machine's slots are "
                        "started here (Horde never SSHes: other hosts join with --join)")
    parser.add_argument("-hostfile", "--hostfile", help="file of 'HOST slots=N' lines")
    parser.add_argument("--host-discovery-script", help="script printing HOST[:SLOTS] lines; "
                        "polled to grow or shrink this machine's workers")
    parser.add_argument("--slots-per-host", "--slots", type=int, default=None,
                        help="slots for hosts listed without a count (default 1)")
    parser.add_argument("--elastic-timeout", type=float, help="seconds to wait below --min-np "
                        "before failing (default 600)")
    parser.add_argument("--reset-limit", type=int, help="fail after this many resets")
    parser.add_argument("--blacklist-cooldown-range", nargs=2, type=float,
                        metavar=("MIN", "MAX"), help="evicted nodes may return after a cooldown "
                        "between MIN and MAX seconds (doubling per eviction); default: never")
    parser.add_argument("--start-timeout", type=float,
                        help="seconds to wait for the first -np workers (default 30)")
    parser.add_argument("--network-interfaces", "--network-interface", dest="network_interfaces",
                        help="comma-separated interfaces to advertise and bind (e.g. eth0); "
                        "without --listen, the embedded etcd and coordinator also serve on "
                        "the first one's address, so the printed --join command works from "
                        "other machines")
    parser.add_argument("--verbose", action="store_true", help="log what the launcher does")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="level of Horde's log messages in the workers: membership "
                        "changes, resets, rejected contributions, compression stats (default "
                        "INFO, DEBUG with --verbose; TRACE is DEBUG)")
    parser.add_argument("--output-filename", help="also write each worker's output to "
                        "DIR/rank.N/stdout and stderr")
    parser.add_argument("--gloo", action="store_true", help="accepted: Horde always uses Gloo "
                        "(and NCCL for CUDA tensors)")
    parser.add_argument("--mpi", action="store_true", help="not supported (Horde has no MPI)")
    parser.add_argument("--check-build", "-cb", action="store_true",
                        help="print the available frameworks and collectives, then exit")
    horde = parser.add_argument_group("Horde")
    horde.add_argument("--rendezvous", help="etcd://HOST:PORT, or the members of an etcd "
                       "cluster as etcd://H1:P1,H2:P2,H3:P3 (failed over in that order); "
                       "default: an embedded etcd on a free port of loopback, or of --listen")
    horde.add_argument("--listen", metavar="ADDR|IFACE",
                       help="address of this machine (or an interface's) that the embedded "
                       "etcd and the embedded coordinator serve on, that the printed --join "
                       "command names, and (without --network-interfaces) that this machine's "
                       "workers advertise (env HORDE_LISTEN; default: the address of "
                       "--network-interfaces, else loopback). Volunteers there get their own etcd "
                       "users from the coordinator; add --etcd-tls so passwords do not cross "
                       "the network in clear (docs/nat.md, docs/security.md)")
    horde.add_argument("--relay", choices=["auto", "always", "never"],
                       help="when generations exchange through the relay that horderun serves "
                       "on --listen for members behind NAT: auto (when a member accepts no "
                       "inbound connection), always, never (env HORDE_RELAY_MODE; default "
                       "auto; docs/nat.md)")
    horde.add_argument("--job", help="job name (default: a fresh random name)")
    horde.add_argument("--join", action="store_true",
                       help="add -np workers to the running job --job on --rendezvous")
    horde.add_argument("--node-id-prefix", help="stable name for this machine's workers "
                       "(node ids are PREFIX-INDEX); blacklists apply to node ids")
    horde.add_argument("--lease-ttl", type=int, help="seconds without a keep-alive before a "
                       "worker counts as dead (default 5)")
    horde.add_argument("--settle-window", type=float, help="seconds joins are batched into one "
                       "reset (default 0.5)")
    horde.add_argument("--admission-window", type=float,
                       help="longest a join waits for later joins to share its reset, in "
                       "seconds (default 2; never less than --settle-window)")
    horde.add_argument("--reset-timeout", type=float, help="seconds to wait for live members "
                       "to rejoin after a failed collective (default 15)")
    horde.add_argument("--collective-timeout", type=float,
                       help="seconds a collective may wait for a peer (default 60)")
    horde.add_argument("--exit-wait", type=float, metavar="SECONDS",
                       help="once a worker has finished, stop the others if they still run "
                       "after SECONDS, with exit code 1 (env HORDE_EXIT_WAIT; default: wait "
                       "for them however long they take)")
    horde.add_argument("--exit-report-interval", type=float, metavar="SECONDS",
                       help="once a worker has finished, say every SECONDS which workers still "
                       "run and what they wait on (env HORDE_EXIT_REPORT_INTERVAL; default 30; "
                       "0: never)")
    horde.add_argument("--coordinator", default=None, metavar="URL|embedded|none",
                       help="where workers report rounds for credit: 'embedded' (default: a "
                       "coordinator on loopback, or on --listen, with a SQLite ledger and a "
                       "status page), the URL of a horde-coordinator (several, "
                       "comma-separated, are failed over in order), or 'none'")
    horde.add_argument("--coordinator-db", metavar="URL",
                       help="ledger of the embedded coordinator (default: ledger.sqlite in "
                       "the data folder, kept across runs)")
    horde.add_argument("--data-dir", metavar="DIR",
                       help="folder of the embedded coordinator's ledger and admin token (env "
                       "HORDE_DATA_DIR; default: the user's data folder, e.g. "
                       "~/.local/share/horde)")
    horde.add_argument("--coordinator-port", type=int, default=0,
                       help="port of the embedded coordinator (default: a free one)")
    horde.add_argument("--etcd-auth", action=argparse.BooleanOptionalAction, default=None,
                       help="etcd authentication in the embedded etcd (on by default): a root "
                       "user (password in a 0600 file in etcd's data folder), a control "
                       "identity for this launcher, its coordinator and each worker it "
                       "starts, and one user per volunteer, issued by the coordinator. "
                       "--no-etcd-auth (env HORDE_ETCD_AUTH=0) lets anyone who reaches etcd "
                       "rewrite the job; see docs/security.md")
    horde.add_argument("--etcd-tls", action=argparse.BooleanOptionalAction, default=None,
                       help="the embedded etcd serves https with a CA and server certificate "
                       "made at start; joiners get the CA from the coordinator, pinned by the "
                       "SHA-256 in the printed --join command. Default: on when serving "
                       "beyond loopback (--listen), off on loopback (env HORDE_ETCD_TLS=1/0; "
                       "docs/security.md)")
    horde.add_argument("--etcd-cacert", metavar="FILE",
                       help="CA bundle that verifies an https:// rendezvous (env "
                       "HORDE_ETCD_CACERT; default: the system's CAs)")
    horde.add_argument("--etcd-ca-sha256", metavar="FINGERPRINT",
                       help="with --join: the SHA-256 of the job's etcd CA (the owner's join "
                       "command gives it); the CA the coordinator sends is used only if it "
                       "matches (env HORDE_ETCD_CA_SHA256)")
    horde.add_argument("--etcd-cert", metavar="FILE",
                       help="client certificate for an etcd with --client-cert-auth (env "
                       "HORDE_ETCD_CERT; needs --etcd-key)")
    horde.add_argument("--etcd-key", metavar="FILE",
                       help="key of --etcd-cert (env HORDE_ETCD_KEY)")
    horde.add_argument("--trusted-peers", action="store_true",
                       help="every member of this job is trusted: objects from peers "
                       "(broadcast_object, allgather_object, elastic state) are fully unpickled, "
                       "so lambdas and custom classes travel; never with volunteers, since a "
                       "peer's pickle can run any code here (env HORDE_TRUSTED_PEERS=1; "
                       "default: peers' objects are read as data only)")
    horde.add_argument("--robust-aggregation", type=int, default=None, metavar="F",
                       help="leave the F gradients furthest from the others out of every "
                       "aggregate (multi-Krum; top-k and staleness rounds only, needs more "
                       "than 2F contributors a round; costs F members' samples a round and, in "
                       "top-k warm-up, dense allgathers). Joiners follow the job's value "
                       "(env HORDE_ROBUST_AGGREGATION; default 0: plain average)")
    horde.add_argument("--evict", metavar="NODE_ID", help="blacklist NODE_ID in --job (needs "
                       "--rendezvous) and exit")
    horde.add_argument("--reason", default="evicted by an operator", help="reason for --evict")
    horde.add_argument("--status", action="store_true",
                       help="print the job's generation, nodes and blacklist, then exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the training command")
    return parser


def _ipv4_interfaces() -> dict[str, list[str]]:
    """This machine's interfaces and their IPv4 addresses (interfaces without one: [])."""
    import psutil

    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def _describe_interfaces(interfaces: dict[str, list[str]]) -> str:
    """`eth0 192.0.2.2, lo 127.0.0.1, wg0 (no IPv4)` for error messages."""
    return ", ".join(f"{name} {' '.join(addrs) or '(no IPv4)'}"
                     for name, addrs in sorted(interfaces.items()))


def _advertise_addr(interfaces: str | None, rendezvous: str | None) -> str:
    if interfaces:
        found = _ipv4_interfaces()
        for name in interfaces.split(","):
            for addr in found.get(name.strip(), []):
                return addr
        raise UsageError(f"--network-interfaces {interfaces!r}: no IPv4 address found on "
                         f"{interfaces}; available: {_describe_interfaces(found)}")
    if rendezvous:
        from rendezvous.etcd import parse_endpoints

        host = parse_endpoints(rendezvous)[0].host
        if host not in hostlib.LOCAL_NAMES:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.connect((host, 9))
                    return probe.getsockname()[0]
            except OSError:
                pass
    return "127.0.0.1"


def listen_addr(value: str, source: str = "--listen") -> str:
    """The IPv4 address `--listen` names (an address of this machine, or an interface that
    has one); UsageError, naming the interfaces available, for anything else."""
    import ipaddress

    found = _ipv4_interfaces()
    if value == "localhost":
        return "127.0.0.1"
    if value in found:
        if not found[value]:
            raise UsageError(f"{source} {value!r}: the interface has no IPv4 address; "
                             f"available: {_describe_interfaces(found)}")
        return found[value][0]
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise UsageError(f"{source} {value!r} is neither an IPv4 address nor an interface of "
                         f"this machine; available: {_describe_interfaces(found)}") from None
    if ip.version != 4:
        raise UsageError(f"{source} {value!r}: only IPv4 addresses are supported for now; "
                         f"available: {_describe_interfaces(found)}")
    if ip.is_unspecified:
        raise UsageError(f"{source} {value}: the printed --join command needs the one address "
                         "volunteers dial, not every interface; name one of those available: "
                         f"{_describe_interfaces(found)}")
    if ip.is_loopback or any(value in addrs for addrs in found.values()):
        return str(ip)
    raise UsageError(f"{source} {value}: not an address of this machine, so nothing can serve "
                     f"there; available: {_describe_interfaces(found)}")


def _is_loopback(addr: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(addr).is_loopback


def _check_command(command: list[str]) -> None:
    if not command:
        raise UsageError("no training command given; e.g. horderun -np 2 python train.py")
    exe = command[0]
    if shutil.which(exe) is None and not os.path.isfile(exe):
        raise UsageError(f"command {exe!r} was not found on PATH")
    if os.path.basename(exe).startswith("python") and len(command) > 1:
        script = command[1]
        if not script.startswith("-") and not os.path.isfile(script):
            raise UsageError(f"training script {script!r} does not exist "
                             f"(working directory: {os.getcwd()})")


def check_counts(args: argparse.Namespace) -> None:
    """Refuse worker counts that cannot work together (-np, --min-np, --max-np)."""
    for flag, value in (("-np", args.np), ("--min-np", args.min_np), ("--max-np", args.max_np),
                        ("--slots-per-host", args.slots_per_host)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value} must be at least 1")
    if args.min_np is not None and args.max_np is not None and args.min_np > args.max_np:
        raise UsageError(f"--min-np {args.min_np} is above --max-np {args.max_np}; the "
                         "smallest world the job may shrink to cannot exceed the largest")
    if args.np is not None and args.max_np is not None and args.np > args.max_np:
        raise UsageError(f"-np {args.np} is above --max-np {args.max_np}; start at most "
                         "--max-np workers, or raise --max-np")
    # Others may make up the difference: machines listed by -H/--hostfile or a discovery
    # script, or launchers that --join through a shared etcd.
    others_join = (args.join or args.hosts or args.hostfile or args.host_discovery_script
                   or args.rendezvous or _env("HORDE_RENDEZVOUS"))
    if args.np is not None and args.min_np is not None and args.np < args.min_np \
            and not others_join:
        raise UsageError(f"-np {args.np} is below --min-np {args.min_np}; the job would wait "
                         "for workers nobody starts: start at least --min-np here, or let "
                         "other machines join (list them with -H, or give --rendezvous "
                         "etcd://HOST:PORT of a shared etcd)")


def rendezvous_url(args: argparse.Namespace) -> str | None:
    """`--rendezvous` (or `HORDE_RENDEZVOUS`), checked to name an etcd."""
    url = args.rendezvous or _env("HORDE_RENDEZVOUS")
    if url is None:
        return None
    source = "--rendezvous" if args.rendezvous else "HORDE_RENDEZVOUS"
    if "://" not in url:
        raise UsageError(f"{source} {url!r} must look like etcd://HOST:PORT (https://HOST:PORT "
                         "for TLS)")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in RENDEZVOUS_SCHEMES:
        raise UsageError(f"{source} {url!r} has the unknown scheme {scheme!r}; Horde's "
                         "rendezvous is etcd: give etcd://HOST:PORT")
    from rendezvous.etcd import parse_endpoints

    try:
        parse_endpoints(url)
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None
    return url


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def apply_tls_flags(args: argparse.Namespace) -> None:
    """--etcd-cacert/--etcd-cert/--etcd-key become HORDE_ETCD_CACERT/CERT/KEY (a flag wins
    over the variable), which `EtcdTLS.from_env` reads for this process, its in-process
    coordinator and its workers; UsageError for a file that cannot be used."""
    from rendezvous.etcd_tls import ENV, EtcdTLS

    for name, variable in ENV.items():
        value = getattr(args, f"etcd_{name}", None)
        if value:
            os.environ[variable] = os.path.abspath(os.path.expanduser(value))
    try:
        EtcdTLS.from_env()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def build_plan(args: argparse.Namespace) -> LaunchPlan:
    """Resolve flags, `HORDE_*` variables and defaults into one validated plan."""
    if args.mpi:
        raise UsageError("--mpi is not supported: Horde runs collectives on Gloo/NCCL process "
                         "groups; drop the flag")
    check_counts(args)
    rendezvous = rendezvous_url(args)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    _check_command(command)
    slots_default = args.slots_per_host or 1
    np = args.np
    if args.hosts or args.hostfile:
        try:
            listed = (hostlib.parse_hosts(args.hosts, slots_default) if args.hosts
                      else hostlib.parse_hostfile(args.hostfile, slots_default))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        local, remote = hostlib.local_slots(listed)
        if remote:
            sys.stderr.write(
                "horderun: Horde does not SSH into hosts; on each of "
                f"{', '.join(remote)} run: horderun --join --rendezvous <url> --job <name> "
                "-np <slots> <command>\n")
        if np is None:
            np = local
    if np is None and args.host_discovery_script:
        np = args.min_np or 1
    if np is None:
        raise UsageError("-np is required (number of workers to start here)")
    if args.max_np is not None and np > args.max_np:
        raise UsageError(f"the hosts list {np} slots on this machine, above --max-np "
                         f"{args.max_np}; list fewer slots, or raise --max-np")
    elastic = args.min_np is not None or args.max_np is not None or bool(
        args.host_discovery_script)
    min_np = args.min_np if args.min_np is not None else (1 if elastic else np)
    max_np = args.max_np if args.max_np is not None else (max(np, 1 << 16) if elastic else np)
    if args.join and elastic is False:
        min_np, max_np = 1, max(np, 1)
    if args.join and not rendezvous:
        raise UsageError("--join needs --rendezvous etcd://HOST:PORT of the running job")
    if args.join and not (args.job or _env("HORDE_JOB")):
        raise UsageError("--join needs --job NAME of the running job")
    job = args.job or _env("HORDE_JOB") or f"job-{uuid.uuid4().hex[:8]}"
    try:
        rdzv = RendezvousSettings.from_env(
            job=job, min_np=min_np, max_np=max_np,
            target_np=min(max(np, min_np), max_np),
            lease_ttl=args.lease_ttl, settle_window=args.settle_window,
            admission_window=args.admission_window,
            start_timeout=args.start_timeout, elastic_timeout=args.elastic_timeout,
            reset_timeout=args.reset_timeout, relay_mode=args.relay,
            blacklist_cooldown=tuple(args.blacklist_cooldown_range)
            if args.blacklist_cooldown_range else None,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    hostname = _env("HORDE_HOSTNAME") or socket.gethostname()
    # A flag wins over HORDE_*, which wins over Horovod's variable, which wins over the default.
    level = (args.log_level or ("DEBUG" if args.verbose else None) or _env("HORDE_LOG_LEVEL")
             or _env("HOROVOD_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise UsageError(f"log level {level!r} (HORDE_LOG_LEVEL / HOROVOD_LOG_LEVEL) must be "
                         f"one of {', '.join(LOG_LEVELS)}")
    collective_timeout = _seconds(args.collective_timeout, ("HORDE_COLLECTIVE_TIMEOUT",
                                  "HOROVOD_GLOO_TIMEOUT_SECONDS"), "--collective-timeout", 60.0)
    assert collective_timeout is not None
    if collective_timeout <= 0:
        raise UsageError(f"--collective-timeout {collective_timeout} must be positive")
    raw_interval = _env("HORDE_DISCOVERY_INTERVAL") or "5"
    try:
        discovery_interval = float(raw_interval)
    except ValueError:
        discovery_interval = -1.0
    if not discovery_interval > 0:
        raise UsageError(f"HORDE_DISCOVERY_INTERVAL={raw_interval!r} must be a positive number "
                         "of seconds (between runs of --host-discovery-script)")
    if args.reset_limit is not None and args.reset_limit < 0:
        raise UsageError(f"--reset-limit {args.reset_limit} must not be negative")
    exit_wait = _seconds(args.exit_wait, ("HORDE_EXIT_WAIT",), "--exit-wait", None)
    if exit_wait is not None and exit_wait <= 0:
        raise UsageError(f"--exit-wait {exit_wait:g} must be a positive number of seconds")
    report_interval = _seconds(args.exit_report_interval, ("HORDE_EXIT_REPORT_INTERVAL",),
                               "--exit-report-interval", 30.0)
    if report_interval is None or report_interval < 0:
        raise UsageError(f"--exit-report-interval {report_interval:g} must be >= 0 seconds "
                         "(0: never)")
    interfaces = args.network_interfaces or _env("HOROVOD_GLOO_IFACE")
    listen_flag = args.listen or _env("HORDE_LISTEN")
    listen = (listen_addr(listen_flag, "--listen" if args.listen else "HORDE_LISTEN")
              if listen_flag else None)
    # Workers serve the store and Gloo where --network-interfaces says, else where --listen
    # does; the embedded etcd and coordinator serve on --listen, else on that interface.
    advertise = (_advertise_addr(interfaces, rendezvous)
                 if interfaces or listen is None or _is_loopback(listen) else listen)
    if listen is None:
        listen = advertise if interfaces else "127.0.0.1"
    return LaunchPlan(
        command=command, np=np, rdzv=rdzv, rendezvous_url=rendezvous, join=args.join,
        collective_timeout=collective_timeout, reset_limit=args.reset_limit,
        advertise_addr=advertise, listen_addr=listen,
        hostname=hostname, node_prefix=args.node_id_prefix or "",
        output_filename=args.output_filename, log_level="DEBUG" if level == "TRACE" else level,
        discovery_script=args.host_discovery_script, slots_per_host=slots_default,
        coordinator=_coordinator_choice(args),
        coordinator_db=args.coordinator_db,
        data_dir=data_dir(args.data_dir),
        coordinator_port=args.coordinator_port, discovery_interval=discovery_interval,
        exit_wait=exit_wait, exit_report_interval=report_interval,
        trusted_peers=args.trusted_peers or _truthy(_env("HORDE_TRUSTED_PEERS")),
        robust_aggregation=_robust(args.robust_aggregation),
        etcd_auth=_etcd_auth(args.etcd_auth, rendezvous),
        etcd_tls=_etcd_tls(args, rendezvous, listen),
        etcd_ca_sha256=_ca_pin(args.etcd_ca_sha256),
    )


def _ca_pin(flag: str | None) -> str | None:
    """--etcd-ca-sha256, else HORDE_ETCD_CA_SHA256, as `AB:CD:...`; UsageError if malformed."""
    from rendezvous.etcd_tls import parse_fingerprint

    text = flag or _env("HORDE_ETCD_CA_SHA256")
    if text is None:
        return None
    try:
        return parse_fingerprint(text)
    except ValueError as exc:
        raise UsageError(f"--etcd-ca-sha256: {exc}") from None


def _switch(flag: bool | None, variable: str, what: str) -> bool | None:
    """A --[no-]X flag, else the on/off variable `variable` (None: neither given)."""
    if flag is not None:
        return flag
    text = _env(variable)
    if text is None or not text.strip():
        return None
    if text.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise UsageError(f"{variable}={text!r} must be 1 or 0 ({what} on or off)")
    return _truthy(text)


def _etcd_auth(flag: bool | None, rendezvous: str | None) -> bool:
    """--[no-]etcd-auth, else HORDE_ETCD_AUTH, else on exactly when the etcd is embedded."""
    chosen = _switch(flag, "HORDE_ETCD_AUTH", "authentication in the embedded etcd")
    return rendezvous is None if chosen is None else chosen


def _etcd_tls(args: argparse.Namespace, rendezvous: str | None, listen: str) -> bool:
    """--[no-]etcd-tls, else HORDE_ETCD_TLS, else on exactly when the embedded etcd serves
    beyond loopback (passwords and tokens then cross a network)."""
    chosen = _switch(args.etcd_tls, "HORDE_ETCD_TLS", "TLS in the embedded etcd")
    if chosen is None:
        return rendezvous is None and not _is_loopback(listen)
    if chosen and rendezvous:
        raise UsageError("--etcd-tls makes the embedded etcd serve https; for --rendezvous "
                         "give its URL as https://HOST:PORT and its CA with --etcd-cacert")
    return chosen


def _robust(flag: int | None) -> int:
    """--robust-aggregation F, else HORDE_ROBUST_AGGREGATION, else 0 (off)."""
    if flag is None:
        text = _env("HORDE_ROBUST_AGGREGATION") or "0"
        try:
            flag = int(text)
        except ValueError:
            raise UsageError(f"HORDE_ROBUST_AGGREGATION={text!r} must be an integer (the "
                             "number of hostile members to outvote; 0: off)") from None
    if flag < 0:
        raise UsageError(f"--robust-aggregation {flag} must be >= 0 (the number of hostile "
                         "members to outvote; 0: off)")
    return flag


def _seconds(flag: float | None, variables: tuple[str, ...], name: str,
             default: float | None) -> float | None:
    """A duration from its flag, else the first of its variables that is set (HORDE_*
    before HOROVOD_*), else the default."""
    if flag is not None:
        return flag
    for variable in variables:
        text = _env(variable)
        if text is None:
            continue
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"{variable}={text!r} ({name}) must be a number of "
                             "seconds") from None
    return default


def data_dir(flag: str | None = None) -> str:
    """Where the embedded coordinator keeps its ledger: `--data-dir`, else HORDE_DATA_DIR,
    else the user's data folder (platformdirs), so credits outlive the run."""
    chosen = flag or _env("HORDE_DATA_DIR")
    if chosen is None:
        import platformdirs

        chosen = platformdirs.user_data_dir("horde", appauthor=False)
    return os.path.abspath(os.path.expanduser(chosen))


def _coordinator_choice(args: argparse.Namespace) -> str:
    choice = args.coordinator or _env("HORDE_COORDINATOR") or "embedded"
    if choice in ("embedded", "none"):
        return choice
    from elastic.coordinator_client import parse_urls

    try:
        parse_urls(choice)
    except ValueError as exc:
        raise UsageError(f"--coordinator: {exc}; or give 'embedded' or 'none'") from None
    return choice


def _check_build() -> int:
    import torch
    import torch.distributed as dist

    lines = [
        f"Horde v{VERSION}:", "",
        "Available Frameworks:",
        f"    [X] PyTorch {torch.__version__}",
        "", "Available Controllers:", "    [ ] MPI", "    [X] Gloo (etcd rendezvous)",
        "", "Available Tensor Operations:",
        f"    [{'X' if dist.is_nccl_available() else ' '}] NCCL",
        "    [ ] DDL", "    [ ] CCL", "    [ ] MPI",
        f"    [{'X' if dist.is_gloo_available() else ' '}] Gloo",
    ]
    print("\n".join(lines))
    return 0


def _admin(args: argparse.Namespace) -> int:
    from rendezvous import backend_from_url
    from rendezvous.agent import blacklist_node, read_control
    from rendezvous.errors import RendezvousPermissionError
    from rendezvous.keys import JobKeys

    url = rendezvous_url(args)
    job = args.job or _env("HORDE_JOB")
    if not url or not job:
        raise UsageError("--evict and --status need --rendezvous etcd://HOST:PORT and --job NAME")
    backend = backend_from_url(url)
    keys = JobKeys(RendezvousSettings().prefix, job)
    try:
        config = backend.get(keys.config)
    except RendezvousPermissionError as exc:
        raise RendezvousPermissionError(
            f"{exc}. The job's etcd runs with authentication: as the job owner, give its "
            "root identity, e.g. HORDE_ETCD_USER=root HORDE_ETCD_PASSWORD_FILE=<the root "
            "password file horderun printed> (docs/security.md)") from None
    if config is None:
        raise UsageError(f"job {job!r} does not exist on {url}")
    if args.evict:
        cooldown = (tuple(args.blacklist_cooldown_range) if args.blacklist_cooldown_range
                    else _job_cooldown(backend, keys))
        entry = blacklist_node(backend, keys, args.evict, args.reason, cooldown)
        until = "for good" if entry.until == float("inf") else f"for {entry.until:.0f} (epoch s)"
        print(f"evicted {args.evict} from job {job} {until}: {args.reason}")
        return 0
    control, _ = read_control(backend, keys)
    nodes, _ = backend.get_prefix(keys.nodes)
    banned, _ = backend.get_prefix(keys.blacklist)
    gen = control.generation
    print(f"job {job}: status {control.status.state if control.status else 'starting'}"
          f"{': ' + control.status.message if control.status and control.status.message else ''}")
    if gen:
        print(f"generation {gen.id} ({gen.reason}): " + ", ".join(
            f"rank {r} {m.node_id}@{m.host}" for r, m in enumerate(gen.members)))
    print("registered: " + (", ".join(kv.key.rsplit("/", 1)[-1] for kv in nodes) or "none"))
    print("blacklisted: " + (", ".join(kv.key.rsplit("/", 1)[-1] for kv in banned) or "none"))
    return 0


def _job_cooldown(backend: object, keys: object) -> tuple[float, float] | None:
    from rendezvous import records

    kv = backend.get(keys.config)  # type: ignore[attr-defined]
    try:
        raw = records.parse_job_config(kv.value)["rendezvous"].get("HORDE_BLACKLIST_COOLDOWN", "")
        low, high = (float(part) for part in raw.split())
    except (records.InvalidRecordError, ValueError):
        return None  # no range (or none readable): the blacklist entry is for good
    return (low, high) if 0 <= low <= high < float("inf") else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        check_counts(args)
    except UsageError as exc:
        parser.error(str(exc))  # exits with code 2, as argparse does for its own checks
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="horderun %(levelname)s %(name)s: %(message)s")
    try:
        if args.check_build:
            return _check_build()
        apply_tls_flags(args)
        if args.evict or args.status:
            return _admin(args)
        plan = build_plan(args)
        return Launcher(plan).run()
    except UsageError as exc:
        sys.stderr.write(f"horderun: error: {exc}\n")
        return 2
    except HordeError as exc:
        sys.stderr.write(f"horderun: error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
