"""`horde-volunteer`: lend this machine to a Horde job, see what it does, pause it.

    horde-volunteer join https://COORDINATOR/JOB     # run the agent (Ctrl-C leaves)
    horde-volunteer confirm | pause | resume | leave | status | gui
    horde-volunteer forget https://COORDINATOR/JOB   # drop the pinned owner key
    horde-volunteer manifest keygen --key owner.key  # job owner: make a signing key
    horde-volunteer manifest sign --key owner.key --dir JOBDIR --job NAME \
        --rendezvous etcd://HOST:2379 --requirement torch -- train.py --epochs 3

Settings: the config file (~/.config/horde-volunteer/config.toml, or --config), then
`HORDE_*` variables, then these flags (see docs/volunteer.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from volunteer_client.settings import VolunteerSettings, load_settings

SETTING_FLAGS = {
    "run_mode": ("--run-mode", {"choices": ["always", "idle"]}),
    "idle_minutes": ("--idle-minutes", {"type": float}),
    "pause_on_battery": ("--pause-on-battery", {"choices": ["yes", "no"]}),
    "min_battery_percent": ("--min-battery-percent", {"type": float}),
    "max_gpu_temp_c": ("--max-gpu-temp", {"type": float}),
    "pause_when_gpu_busy": ("--pause-when-gpu-busy", {"choices": ["yes", "no"]}),
    "gpu_memory_fraction": ("--gpu-memory-fraction", {"type": float}),
    "gpus": ("--gpus", {"help": "comma-separated GPU indices (default: all)"}),
    "schedule": ("--schedule", {"help": "windows separated by ';', e.g. "
                                        "'mon-fri 18:00-23:30;sat-sun 09:00-23:00'"}),
    "use_cpu": ("--use-cpu", {"choices": ["yes", "no"]}),
    "cpu_threads": ("--cpu-threads", {"type": int}),
    "data_dir": ("--data-dir", {}),
    "display_name": ("--name", {"dest": "display_name"}),
    "registration_token_file": ("--registration-token-file", {}),
    "control_port": ("--control-port", {"type": int}),
    "poll_seconds": ("--poll-seconds", {"type": float}),
    "resume_after_seconds": ("--resume-after", {"type": float}),
    "max_restarts": ("--max-restarts", {"type": int}),
}


def _settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (default "
                        "~/.config/horde-volunteer/config.toml)")
    for name, (flag, extra) in SETTING_FLAGS.items():
        extra = dict(extra)
        extra.setdefault("dest", name)
        parser.add_argument(flag, default=None, **extra)


def make_parser() -> argparse.ArgumentParser:
    """The `horde-volunteer` command line: join, control commands, owner's manifest tools."""
    parser = argparse.ArgumentParser(
        prog="horde-volunteer", description="Lend this machine's GPUs (or CPU) to a Horde "
        "training job; see what it does and earns; pause it.")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    join = sub.add_parser("join", help="join a job and run its worker when allowed")
    join.add_argument("url", nargs="?", help="https://COORDINATOR/JOB (or HORDE_COORDINATOR)")
    join.add_argument("--yes", action="store_true", help="confirm the job without asking "
                      "(after reading what it runs: horde-volunteer join shows it)")
    _settings_args(join)
    for name, text in [("status", "print the agent's state"), ("pause", "stop working now "
                       "(a graceful leave)"), ("resume", "work again (a join)"),
                       ("leave", "leave the job and stop the agent"),
                       ("confirm", "agree to run the job shown at join"),
                       ("gui", "a window over the running agent")]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config")
        cmd.add_argument("--data-dir", dest="data_dir", default=None)
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="print JSON")
    forget = sub.add_parser("forget", help="forget the owner key pinned for a job")
    forget.add_argument("url")
    forget.add_argument("--config")
    forget.add_argument("--data-dir", dest="data_dir", default=None)
    manifest = sub.add_parser("manifest", help="job owner: make a key, sign a manifest")
    msub = manifest.add_subparsers(dest="manifest_command", required=True)
    keygen = msub.add_parser("keygen", help="create an Ed25519 owner key")
    keygen.add_argument("--key", required=True, help="where to write the private key")
    signp = msub.add_parser("sign", help="pin the job folder's files and sign the manifest")
    signp.add_argument("--key", required=True)
    signp.add_argument("--dir", required=True, help="the job folder (served to volunteers "
                       "by horde-coordinator serve --manifest-dir DIR)")
    signp.add_argument("--job", required=True)
    signp.add_argument("--rendezvous", required=True, help="etcd://HOST:PORT volunteers join")
    signp.add_argument("--etcd-cacert", metavar="FILE",
                       help="with an https:// rendezvous: pin this CA (its SHA-256 goes into "
                       "the signed manifest; volunteers then take the CA the coordinator "
                       "sends only if it matches)")
    signp.add_argument("--requirement", action="append", default=[],
                       help="installed Python package to pin (repeat)")
    signp.add_argument("--description", default="")
    signp.add_argument("--owner", default="")
    signp.add_argument("entrypoint", nargs=argparse.REMAINDER,
                       help="-- SCRIPT.py [ARGS...] (a file of --dir)")
    verify = msub.add_parser("verify", help="check a signed manifest and its folder")
    verify.add_argument("--dir", required=True)
    return parser


def _settings(args: argparse.Namespace, **extra: Any) -> VolunteerSettings:
    flags = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    flags.update(extra)
    return load_settings(args.config, **flags)


def _print_status(status: dict[str, Any]) -> None:
    state = status["state"] + (f" ({status['reason']})" if status.get("reason") else "")
    ranks = ", ".join(f"{n}: rank {r}" for n, r in status.get("ranks", {}).items()
                      if r is not None) or "-"
    gen = status.get("generation")
    lines = [f"state:      {state}",
             f"job:        {status['job']} on {status['coordinator']}",
             f"generation: {gen if gen is not None else '-'}"
             f" (world size {status.get('world_size') or '-'}); {ranks}",
             f"devices:    {', '.join(status['devices']) or 'none'}; worker CPU "
             f"{status['cpu_percent']:.0f}%"]
    for gpu in status.get("gpus", []):
        lines.append(f"GPU {gpu['index']}:      {gpu['name']} {gpu['temp_c']} °C, "
                     f"{gpu['memory_used'] / 2**30:.1f}/{gpu['memory_total'] / 2**30:.1f} GiB, "
                     f"{gpu['utilization']}% busy{'' if gpu['used'] else ' (not used)'}")
    lines.append(f"samples:    {status.get('credit', 0)} credited in "
                 f"{status.get('contributions_accepted', 0)} accepted contributions")
    lines.append(f"credit:     {status.get('credit', 0)} (recent average "
                 f"{status.get('rac', 0.0):.1f}/day)")
    for note in status.get("notes", []):
        lines.append(f"note:       {note}")
    print("\n".join(lines))


def _ca_pin(path: str | None) -> str:
    """The SHA-256 of the CA file `path` for the manifest ("" without one)."""
    if not path:
        return ""
    from rendezvous.etcd_tls import fingerprint

    try:
        return fingerprint(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--etcd-cacert {path}: not a readable PEM certificate ({exc})") from None


def _manifest(args: argparse.Namespace) -> int:
    from volunteer_client import manifest as mf

    if args.manifest_command == "keygen":
        fp = mf.generate_key(args.key)
        print(f"owner key written to {args.key} (keep it secret); fingerprint {fp}")
        return 0
    if args.manifest_command == "sign":
        entry = [a for a in args.entrypoint if a != "--"] if args.entrypoint[:1] == ["--"] \
            else list(args.entrypoint)
        if not entry:
            raise ValueError("give the entrypoint after --: -- train.py [ARGS...]")
        key = mf.load_private_key(args.key)
        manifest = mf.build_manifest(args.dir, args.job, args.rendezvous, entry,
                                     requirements=args.requirement,
                                     description=args.description, owner=args.owner,
                                     etcd_ca_sha256=_ca_pin(args.etcd_cacert))
        target = Path(args.dir) / mf.ENVELOPE_NAME
        target.write_text(json.dumps(mf.sign(manifest, key), indent=1) + "\n")
        print(f"signed {len(manifest.files)} files of job {args.job} -> {target}")
        return 0
    envelope = json.loads((Path(args.dir) / mf.ENVELOPE_NAME).read_text())
    manifest, public = mf.verify_envelope(envelope, None)
    mf.verify_files(manifest, args.dir)
    mf.verify_requirements(manifest)
    print(f"manifest of job {manifest.job} is valid; owner key {mf.fingerprint(public)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `horde-volunteer` command; exit 2 on bad input, 3 agent stopped, 4 refused."""
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="horde-volunteer %(levelname)s %(name)s: %(message)s")
    from volunteer_client.agent import Agent, AgentError, call_agent
    from volunteer_client.manifest import ManifestError

    try:
        if args.command == "manifest":
            return _manifest(args)
        if args.command == "join":
            settings = _settings(args, coordinator=args.url)
            agent = Agent(settings, confirm=args.yes)
            return agent.run(announce=lambda text: print(text, file=sys.stderr, flush=True))
        settings = load_settings(args.config, data_dir=args.data_dir)
        data_dir = settings.data_path
        if args.command == "forget":
            from volunteer_client.manifest import PinStore

            done = PinStore(data_dir / "pins").forget(args.url.rstrip("/"))
            print("forgot the owner key of " + args.url if done else
                  f"no key was pinned for {args.url}")
            return 0
        if args.command == "gui":
            from volunteer_client.gui import run_gui

            return run_gui(data_dir)
        if args.command == "status":
            status = call_agent(data_dir, "GET", "/status")
            if args.json:
                print(json.dumps(status, indent=1, default=str))
            else:
                _print_status(status)
            return 0
        answer = call_agent(data_dir, "POST", f"/{args.command}")
        print(f"{args.command}: agent now {answer.get('state')}")
        return 0
    except ManifestError as exc:
        print(f"horde-volunteer: refused: {exc}", file=sys.stderr)
        return 4
    except (AgentError, ValueError, OSError) as exc:
        print(f"horde-volunteer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
