"""The resource policy: when may the job use this machine, and which devices.

A pure state machine. `PolicyEngine.step(now, facts, user)` takes the time, what the
sensors saw and what the volunteer asked, and returns a `Decision`: run (on which GPUs,
or the CPU) or pause (and every reason why). It reads no clock and no sensor itself, so
tests drive it with a fake clock and fake facts.

States: ``running`` -> ``paused`` at once when anything forbids work; ``paused`` ->
``resuming`` when nothing forbids it any more, -> ``running`` after the conditions held
for `resume_after_seconds` (so a mouse twitch or a GPU at its limit does not flap the
job). The first decision goes straight to running when nothing forbids it. A GPU that got
too hot is usable again only `temp_resume_margin_c` degrees below the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from volunteer_client.settings import VolunteerSettings

RUNNING = "running"
PAUSED = "paused"
RESUMING = "resuming"


@dataclass(frozen=True)
class GpuFacts:
    """One NVIDIA GPU as NVML sees it (`other_processes`: compute processes not ours)."""

    index: int
    name: str = "GPU"
    temp_c: float | None = None
    memory_total: int = 0
    memory_used: int = 0
    utilization: float | None = None
    other_processes: int = 0


@dataclass(frozen=True)
class Facts:
    """What the sensors saw at one moment.

    idle_seconds: time since the last keyboard/mouse input (None: cannot tell).
    on_battery: True on battery, False on mains, None without a battery.
    gpus: the NVIDIA GPUs present; `gpu_note` says why there are none (no driver, ...).
    """

    idle_seconds: float | None = None
    on_battery: bool | None = None
    battery_percent: float | None = None
    gpus: tuple[GpuFacts, ...] = ()
    gpu_note: str = ""


@dataclass(frozen=True)
class UserChoice:
    """What the volunteer said: confirmed the job (a fresh install waits for it), paused."""

    confirmed: bool = True
    paused: bool = False


@dataclass(frozen=True)
class Decision:
    """The policy's answer: `state`, why (`reasons`, empty when running on everything
    allowed), which GPUs to use, whether to use the CPU, and `notes` (e.g. no GPU)."""

    state: str
    reasons: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()
    cpu: bool = False
    notes: tuple[str, ...] = ()
    since: float = 0.0

    @property
    def run(self) -> bool:
        """Whether to run work now (running on at least one device)."""
        return self.state == RUNNING and (bool(self.gpus) or self.cpu)

    def describe(self) -> str:
        """One line for logs and the CLI: `running on GPU 0` or `paused: why`."""
        if self.state == RUNNING:
            where = (", ".join(f"GPU {i}" for i in self.gpus) if self.gpus else "CPU")
            return f"running on {where}"
        return f"{self.state}: " + "; ".join(self.reasons)


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


@dataclass
class PolicyEngine:
    """The state machine; keep one per agent and call `step` every poll."""

    settings: VolunteerSettings
    state: str = ""
    since: float = 0.0
    hot: set[int] = field(default_factory=set)

    def blockers(self, now: datetime, facts: Facts, user: UserChoice
                 ) -> tuple[list[str], tuple[int, ...], bool, list[str]]:
        """Why work may not run now (machine-wide), the usable GPUs, CPU use, notes."""
        s = self.settings
        reasons: list[str] = []
        notes: list[str] = []
        if not user.confirmed:
            reasons.append("waiting for you to confirm the job (horde-volunteer confirm)")
        if user.paused:
            reasons.append("paused by you")
        if s.pause_on_battery and facts.on_battery:
            reasons.append("running on battery")
        if (facts.battery_percent is not None and facts.on_battery is not None
                and facts.battery_percent < s.min_battery_percent):
            reasons.append(f"battery at {facts.battery_percent:.0f}% "
                           f"(under {s.min_battery_percent:.0f}%)")
        if s.run_mode == "idle":
            if facts.idle_seconds is None:
                reasons.append("cannot tell whether you are using the computer (no X11 "
                               "idle time); set run_mode = \"always\" to run anyway")
            elif facts.idle_seconds < s.idle_minutes * 60:
                reasons.append(f"computer in use (idle {_fmt_minutes(facts.idle_seconds)}; "
                               f"runs after {s.idle_minutes:g} min without input)")
        if s.windows:
            minute = now.hour * 60 + now.minute
            if not any(w.contains(now.weekday(), minute) for w in s.windows):
                reasons.append("outside the schedule (" + ", ".join(s.schedule) + ")")
        # devices
        present = {g.index: g for g in facts.gpus}
        chosen = [i for i in (s.gpus or sorted(present)) if i in present]
        for i in s.gpus:
            if i not in present:
                notes.append(f"GPU {i} (in settings) is not present")
        usable: list[int] = []
        gpu_reasons: list[str] = []
        for i in chosen:
            gpu = present[i]
            if gpu.temp_c is not None:
                if gpu.temp_c >= s.max_gpu_temp_c:
                    self.hot.add(i)
                elif gpu.temp_c <= s.max_gpu_temp_c - s.temp_resume_margin_c:
                    self.hot.discard(i)
            if i in self.hot:
                gpu_reasons.append(f"GPU {i} at {gpu.temp_c:.0f} °C (limit "
                                   f"{s.max_gpu_temp_c:.0f} °C, resumes at "
                                   f"{s.max_gpu_temp_c - s.temp_resume_margin_c:.0f} °C)")
                continue
            if s.pause_when_gpu_busy and gpu.other_processes > 0:
                gpu_reasons.append(f"GPU {i} is used by {gpu.other_processes} other "
                                   f"program(s)")
                continue
            usable.append(i)
        cpu = False
        if not facts.gpus:
            notes.append(facts.gpu_note or "no NVIDIA GPU found")
            if s.use_cpu:
                cpu = True
                notes.append("running on the CPU")
            else:
                reasons.append("no NVIDIA GPU and use_cpu is off")
        elif not chosen:
            reasons.append("none of the chosen GPUs " + str(list(s.gpus)) + " is present")
        elif not usable:
            reasons.extend(gpu_reasons)
        else:
            notes.extend(f"{r}: not used" for r in gpu_reasons)
        return reasons, tuple(usable), cpu, notes

    def step(self, now: datetime, facts: Facts, user: UserChoice) -> Decision:
        """Advance the state machine to `now` and return what to do."""
        t = now.timestamp()
        reasons, gpus, cpu, notes = self.blockers(now, facts, user)
        previous = self.state
        if reasons:
            new = PAUSED
        elif previous in ("", RUNNING):
            new = RUNNING
        elif previous == PAUSED:
            new = RESUMING if self.settings.resume_after_seconds > 0 else RUNNING
        else:  # resuming
            new = RUNNING if t - self.since >= self.settings.resume_after_seconds else RESUMING
        if new != previous:
            self.state, self.since = new, t
        if new == RESUMING:
            wait = self.settings.resume_after_seconds - (t - self.since)
            reasons = [f"resuming in {max(wait, 0):.0f} s if nothing changes"]
        return Decision(new, tuple(reasons), gpus if new == RUNNING else (),
                        cpu and new == RUNNING, tuple(notes), self.since)
