"""Volunteer settings: one dataclass, read from a TOML file, `HORDE_*` variables and flags.

Rule (as everywhere in Horde): a flag wins over its `HORDE_*` variable, which wins over
the config file, which wins over the default. `load_settings` is the one place that reads
them; the result is validated, and a bad value gets a message naming where it came from.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "HORDE_"
RUN_MODES = ("always", "idle")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*([a-z]{3})(?:-([a-z]{3}))?\s+(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})\s*$")


def default_data_dir() -> Path:
    """Where the client keeps its state (pinned keys, node id, job files): XDG data dir."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "horde-volunteer"


def default_config_file() -> Path:
    """~/.config/horde-volunteer/config.toml (XDG config dir)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "horde-volunteer" / "config.toml"


@dataclass(frozen=True)
class Window:
    """One weekly schedule window: days (0 = Monday) and minutes since midnight."""

    days: frozenset[int]
    start: int
    end: int

    def contains(self, weekday: int, minute: int) -> bool:
        """Whether the window covers `weekday` (0 = Monday) at `minute` after midnight."""
        if self.start <= self.end:
            return weekday in self.days and self.start <= minute < self.end
        # past midnight: "fri 22:00-02:00" covers Friday night and Saturday early morning
        return ((weekday in self.days and minute >= self.start)
                or ((weekday - 1) % 7 in self.days and minute < self.end))


def parse_window(text: str) -> Window:
    """`"mon-fri 18:00-23:30"` or `"sat 09:00-12:00"` -> Window; ValueError otherwise."""
    match = _WINDOW.match(text.lower())
    if not match:
        raise ValueError(f"schedule window {text!r} must look like 'mon-fri 18:00-23:30'")
    first, last, h1, m1, h2, m2 = match.groups()
    for day in (first, last):
        if day is not None and day not in _DAYS:
            raise ValueError(f"schedule window {text!r}: {day!r} is not one of {_DAYS}")
    a = _DAYS.index(first)
    b = _DAYS.index(last) if last else a
    days = frozenset(range(a, b + 1)) if a <= b else frozenset([*range(a, 7), *range(0, b + 1)])
    start, end = int(h1) * 60 + int(m1), int(h2) * 60 + int(m2)
    if not (0 <= start <= 24 * 60 and 0 <= end <= 24 * 60) or int(m1) > 59 or int(m2) > 59:
        raise ValueError(f"schedule window {text!r}: times must lie within 00:00-24:00")
    if start == end:
        raise ValueError(f"schedule window {text!r} is empty (start equals end)")
    return Window(days, start, end)


@dataclass(frozen=True)
class VolunteerSettings:
    """What the volunteer allows, and where the job is.

    coordinator: https://COORDINATOR/JOB (the job's page on its coordinator).
    run_mode: "always", or "idle" (only after `idle_minutes` without keyboard/mouse input).
    pause_on_battery / min_battery_percent: laptops stop on battery or under a charge.
    max_gpu_temp_c / temp_resume_margin_c: pause a GPU hotter than the limit; resume once
        it is `margin` degrees cooler (so it does not flap at the limit).
    pause_when_gpu_busy: pause a GPU while another program computes on it.
    gpu_memory_fraction: the most of each GPU's memory the worker may allocate.
    gpus: which GPUs to lend (NVML indices); empty = all.
    schedule: weekly windows ("mon-fri 18:00-23:30"); empty = any time.
    resume_after_seconds: conditions must hold this long before work resumes.
    use_cpu: lend the CPU when there is no usable NVIDIA GPU.
    cpu_threads: torch threads of a CPU worker.
    registration_token_file: a file holding the coordinator's registration token, when the
        project asks for one (a file, not a setting: settings are shown, tokens not).
    max_restarts / restart_window_seconds: that many crashes within the window stop the client.
    """

    coordinator: str = ""
    run_mode: str = "always"
    idle_minutes: float = 5.0
    pause_on_battery: bool = True
    min_battery_percent: float = 20.0
    max_gpu_temp_c: float = 83.0
    temp_resume_margin_c: float = 5.0
    pause_when_gpu_busy: bool = True
    gpu_memory_fraction: float = 0.9
    gpus: tuple[int, ...] = ()
    schedule: tuple[str, ...] = ()
    resume_after_seconds: float = 10.0
    use_cpu: bool = True
    cpu_threads: int = 1
    data_dir: str = ""
    display_name: str = ""
    registration_token_file: str = ""
    control_port: int = 0
    poll_seconds: float = 2.0
    max_restarts: int = 5
    restart_window_seconds: float = 600.0
    restart_backoff_seconds: float = 2.0
    windows: tuple[Window, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.run_mode not in RUN_MODES:
            raise ValueError(f"run_mode={self.run_mode!r} must be one of {RUN_MODES}")
        checks = [
            ("idle_minutes", 0.0, 24 * 60.0), ("min_battery_percent", 0.0, 100.0),
            ("max_gpu_temp_c", 30.0, 110.0), ("temp_resume_margin_c", 0.0, 40.0),
            ("gpu_memory_fraction", 0.05, 1.0), ("resume_after_seconds", 0.0, 3600.0),
            ("cpu_threads", 1, 1024), ("control_port", 0, 65535),
            ("poll_seconds", 0.05, 600.0), ("max_restarts", 0, 1000),
            ("restart_window_seconds", 1.0, 7 * 86400.0),
            ("restart_backoff_seconds", 0.0, 3600.0),
        ]
        for name, low, high in checks:
            value = getattr(self, name)
            if not low <= value <= high:  # also false for NaN
                raise ValueError(f"{name}={value!r} must lie between {low} and {high}")
        for index in self.gpus:
            if not 0 <= index < 64:
                raise ValueError(f"gpus: {index} is not a GPU index (0-63)")
        object.__setattr__(self, "windows", tuple(parse_window(w) for w in self.schedule))
        if self.coordinator:
            split_job_url(self.coordinator)  # raises with a clear message

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()


def split_job_url(url: str) -> tuple[str, str]:
    """`https://host:8080/myjob` -> ("https://host:8080", "myjob"); ValueError otherwise."""
    match = re.fullmatch(r"(https?://[^/\s]+(?:/[^\s]*?)?)/+([A-Za-z0-9._-]{1,64})/*", url)
    if not match:
        raise ValueError(f"coordinator {url!r} must look like https://COORDINATOR/JOB "
                         "(the job's address on its coordinator)")
    return match.group(1), match.group(2)


def _convert(name: str, kind: str, raw: Any, source: str) -> Any:
    """A value from TOML or the environment, converted to the field's type."""
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        if kind.startswith("tuple[int"):
            items = raw if isinstance(raw, list) else [s for s in str(raw).split(",") if s.strip()]
            return tuple(int(i) for i in items)
        if kind.startswith("tuple[str"):
            items = raw if isinstance(raw, list) else [s for s in str(raw).split(";") if s.strip()]
            return tuple(str(i).strip() for i in items)
        if not isinstance(raw, str):
            raise ValueError(raw)
        return raw
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {name}={raw!r} is not a valid {kind}") from None


_FIELDS = {f.name: str(f.type) for f in fields(VolunteerSettings) if f.name != "windows"}


def load_settings(config_file: str | os.PathLike[str] | None = None,
                  environ: Mapping[str, str] | None = None,
                  **flags: Any) -> VolunteerSettings:
    """Settings from the config file (default: ~/.config/horde-volunteer/config.toml if it
    exists), then `HORDE_<NAME>` variables, then non-None flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = Path(config_file) if config_file else Path(
        environ.get("HORDE_CONFIG") or default_config_file())
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"config file {path}: {exc}") from None
        section = data.get("volunteer", data)
        for key, raw in section.items():
            if key not in _FIELDS:
                raise ValueError(f"config file {path}: unknown setting {key!r}; known: "
                                 f"{', '.join(sorted(_FIELDS))}")
            values[key] = _convert(key, _FIELDS[key], raw, f"config file {path}")
    elif config_file:
        raise ValueError(f"config file {path} does not exist")
    for key, kind in _FIELDS.items():
        raw = environ.get(ENV_PREFIX + key.upper())
        if raw not in (None, ""):
            values[key] = _convert(key, kind, raw, f"{ENV_PREFIX}{key.upper()}")
    for key, raw in flags.items():
        if raw is None:
            continue
        if key not in _FIELDS:
            raise TypeError(f"unknown setting {key!r}")
        values[key] = _convert(key, _FIELDS[key], raw, f"--{key.replace('_', '-')}")
    return VolunteerSettings(**values)


def with_changes(settings: VolunteerSettings, **changes: Any) -> VolunteerSettings:
    """A copy with some settings changed (validated again; the GUI's settings dialog)."""
    converted = {k: _convert(k, _FIELDS[k], v, "settings") for k, v in changes.items()
                 if k in _FIELDS}
    unknown = set(changes) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    return replace(settings, **converted)


def save_settings(settings: VolunteerSettings, path: str | os.PathLike[str]) -> None:
    """Write the settings that differ from the defaults as a TOML `[volunteer]` table."""
    default = VolunteerSettings()
    lines = ["[volunteer]"]
    for key in _FIELDS:
        value = getattr(settings, key)
        if value == getattr(default, key):
            continue
        lines.append(f"{key} = {_toml(value)}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
