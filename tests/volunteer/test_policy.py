"""The resource policy as a state machine: fake clock, fake sensors, every transition."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from volunteer_client.policy import (
    PAUSED,
    RESUMING,
    RUNNING,
    Facts,
    GpuFacts,
    PolicyEngine,
    UserChoice,
)
from volunteer_client.settings import VolunteerSettings, load_settings, parse_window

MONDAY_NOON = datetime(2026, 11, 30, 12, 0)  # a Monday
GPU = GpuFacts(index=0, name="RTX", temp_c=60.0, memory_total=8 << 30)
OK = Facts(idle_seconds=3600.0, on_battery=False, battery_percent=100.0, gpus=(GPU,))
ME = UserChoice(confirmed=True, paused=False)


class Clock:
    """A fake clock: the tests move time by hand."""

    def __init__(self, start: datetime = MONDAY_NOON) -> None:
        self.now = start

    def tick(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def engine(**settings: object) -> PolicyEngine:
    settings.setdefault("resume_after_seconds", 10.0)
    return PolicyEngine(VolunteerSettings(**settings))  # type: ignore[arg-type]


def test_first_decision_runs_at_once_on_the_gpu():
    d = engine().step(MONDAY_NOON, OK, ME)
    assert d.state == RUNNING and d.run and d.gpus == (0,) and not d.cpu
    assert d.describe() == "running on GPU 0"


@pytest.mark.parametrize("facts, user, settings, reason", [
    (OK, UserChoice(paused=True), {}, "paused by you"),
    (OK, UserChoice(confirmed=False), {}, "waiting for you to confirm"),
    (Facts(on_battery=True, battery_percent=90.0, gpus=(GPU,)), ME, {}, "on battery"),
    (Facts(on_battery=False, battery_percent=10.0, gpus=(GPU,)), ME, {}, "battery at 10%"),
    (Facts(idle_seconds=30.0, gpus=(GPU,)), ME, {"run_mode": "idle"}, "computer in use"),
    (Facts(idle_seconds=None, gpus=(GPU,)), ME, {"run_mode": "idle"}, "cannot tell"),
    (OK, ME, {"schedule": ("sat-sun 00:00-24:00",)}, "outside the schedule"),
    (Facts(gpus=(GpuFacts(0, temp_c=90.0),)), ME, {}, "GPU 0 at 90 °C"),
    (Facts(gpus=(GpuFacts(0, temp_c=50.0, other_processes=1),)), ME, {},
     "GPU 0 is used by 1 other program"),
    (Facts(gpus=()), ME, {"use_cpu": False}, "no NVIDIA GPU and use_cpu is off"),
    (OK, ME, {"gpus": (3,)}, "none of the chosen GPUs [3] is present"),
])
def test_running_pauses_at_once_for_each_reason(facts, user, settings, reason):
    clock = Clock()
    e = engine(**settings)
    e.state = RUNNING  # was running
    d = e.step(clock.tick(1), facts, user)
    assert d.state == PAUSED and not d.run
    assert any(reason in r for r in d.reasons), d.reasons
    assert d.gpus == () and not d.cpu


def test_paused_resumes_only_after_conditions_held_for_the_delay():
    clock, e = Clock(), engine(resume_after_seconds=10.0)
    assert e.step(clock.now, OK, UserChoice(paused=True)).state == PAUSED
    d = e.step(clock.tick(1), OK, ME)
    assert d.state == RESUMING and not d.run and "resuming in 10 s" in d.reasons[0]
    assert e.step(clock.tick(9), OK, ME).state == RESUMING
    d = e.step(clock.tick(1), OK, ME)
    assert d.state == RUNNING and d.gpus == (0,)


def test_resuming_falls_back_to_paused_and_restarts_the_delay():
    clock, e = Clock(), engine(resume_after_seconds=10.0, run_mode="idle", idle_minutes=1)
    busy = Facts(idle_seconds=5.0, gpus=(GPU,))
    idle = Facts(idle_seconds=120.0, gpus=(GPU,))
    assert e.step(clock.now, busy, ME).state == PAUSED
    assert e.step(clock.tick(1), idle, ME).state == RESUMING
    assert e.step(clock.tick(8), busy, ME).state == PAUSED  # the mouse moved
    assert e.step(clock.tick(1), idle, ME).state == RESUMING
    assert e.step(clock.tick(9), idle, ME).state == RESUMING  # the delay started again
    assert e.step(clock.tick(1), idle, ME).state == RUNNING


def test_no_resume_delay_goes_straight_from_paused_to_running():
    clock, e = Clock(), engine(resume_after_seconds=0.0)
    assert e.step(clock.now, OK, UserChoice(paused=True)).state == PAUSED
    assert e.step(clock.tick(1), OK, ME).state == RUNNING


def test_hot_gpu_resumes_only_below_the_margin():
    clock, e = Clock(), engine(max_gpu_temp_c=83, temp_resume_margin_c=5,
                               resume_after_seconds=0)

    def at(temp: float) -> str:
        return e.step(clock.tick(1), Facts(gpus=(GpuFacts(0, temp_c=temp),)), ME).state

    assert at(82) == RUNNING
    assert at(83) == PAUSED
    assert at(80) == PAUSED  # cooler, but not yet 5 degrees under the limit
    assert at(78) == RUNNING
    assert at(82) == RUNNING


def test_one_hot_gpu_of_two_leaves_the_other_running():
    e = engine()
    facts = Facts(gpus=(GpuFacts(0, temp_c=95.0), GpuFacts(1, temp_c=50.0)))
    d = e.step(MONDAY_NOON, facts, ME)
    assert d.state == RUNNING and d.gpus == (1,)
    assert any("GPU 0 at 95" in n and "not used" in n for n in d.notes)


def test_chosen_gpus_only():
    facts = Facts(gpus=(GpuFacts(0, temp_c=50.0), GpuFacts(1, temp_c=50.0)))
    d = engine(gpus=(1, 5)).step(MONDAY_NOON, facts, ME)
    assert d.gpus == (1,)
    assert "GPU 5 (in settings) is not present" in d.notes


def test_busy_gpu_is_used_when_the_volunteer_allows_sharing():
    facts = Facts(gpus=(GpuFacts(0, temp_c=50.0, other_processes=2),))
    assert engine(pause_when_gpu_busy=False).step(MONDAY_NOON, facts, ME).gpus == (0,)


def test_no_gpu_runs_on_the_cpu_and_says_why():
    facts = Facts(gpus=(), gpu_note="no NVIDIA GPU or driver (Driver Not Loaded)")
    d = engine().step(MONDAY_NOON, facts, ME)
    assert d.run and d.cpu and d.gpus == ()
    assert d.notes[0].startswith("no NVIDIA GPU or driver") and d.describe() == "running on CPU"


def test_battery_rules_follow_the_settings():
    on_battery = Facts(on_battery=True, battery_percent=80.0, gpus=(GPU,))
    assert engine(pause_on_battery=False).step(MONDAY_NOON, on_battery, ME).run
    low_plugged = Facts(on_battery=False, battery_percent=10.0, gpus=(GPU,))
    assert not engine().step(MONDAY_NOON, low_plugged, ME).run
    assert engine(min_battery_percent=0).step(MONDAY_NOON, low_plugged, ME).run
    desktop = Facts(on_battery=None, battery_percent=None, gpus=(GPU,))
    assert engine().step(MONDAY_NOON, desktop, ME).run


def test_weekly_schedule_windows_including_past_midnight():
    e = engine(schedule=("mon-fri 18:00-23:30", "fri 22:00-02:00"), resume_after_seconds=0)
    monday = MONDAY_NOON.replace(hour=17, minute=59)
    assert e.step(monday, OK, ME).state == PAUSED
    assert e.step(monday.replace(hour=18, minute=0), OK, ME).state == RUNNING
    assert e.step(monday.replace(hour=23, minute=30), OK, ME).state == PAUSED
    saturday_1am = MONDAY_NOON + timedelta(days=5, hours=-11)  # Saturday 01:00
    assert saturday_1am.weekday() == 5
    assert e.step(saturday_1am, OK, ME).state == RUNNING
    assert e.step(saturday_1am + timedelta(hours=1), OK, ME).state == PAUSED
    assert e.step(saturday_1am - timedelta(days=1), OK, ME).state == PAUSED  # Fri 01:00
    sunday_to_monday = parse_window("sun-mon 10:00-11:00")
    assert sunday_to_monday.days == frozenset({6, 0})


def test_every_reason_is_listed_together():
    facts = Facts(idle_seconds=1.0, on_battery=True, battery_percent=5.0,
                  gpus=(GpuFacts(0, temp_c=99.0),))
    d = engine(run_mode="idle").step(MONDAY_NOON, facts, UserChoice(paused=True))
    assert len(d.reasons) == 5, d.reasons


# -- settings -------------------------------------------------------------------------

def test_settings_flag_beats_env_beats_file_beats_default(tmp_path):
    conf = tmp_path / "config.toml"
    conf.write_text('[volunteer]\nrun_mode = "idle"\nidle_minutes = 3\n'
                    'max_gpu_temp_c = 75\ngpus = [0, 1]\nschedule = ["mon-fri 18:00-23:00"]\n')
    env = {"HORDE_IDLE_MINUTES": "7", "HORDE_MAX_GPU_TEMP_C": "70"}
    s = load_settings(conf, env, max_gpu_temp_c=65)
    assert s.run_mode == "idle" and s.idle_minutes == 7 and s.max_gpu_temp_c == 65
    assert s.gpus == (0, 1) and s.windows[0].days == frozenset(range(5))
    assert load_settings(None, {"HORDE_CONFIG": str(tmp_path / "none.toml")}).run_mode == "always"


@pytest.mark.parametrize("text, message", [
    ('run_mode = "sometimes"', "run_mode='sometimes' must be one of"),
    ("max_gpu_temp_c = 500", "max_gpu_temp_c=500.0 must lie between"),
    ('schedule = ["weekdays 9-5"]', "must look like 'mon-fri 18:00-23:30'"),
    ("colour = 1", "unknown setting 'colour'"),
    ("idle_minutes = true", "idle_minutes=True is not a valid float"),
    ('coordinator = "ftp://x"', "must look like https://COORDINATOR/JOB"),
    ("run_mode = ", "config file"),
])
def test_bad_settings_are_refused_with_a_clear_message(tmp_path, text, message):
    conf = tmp_path / "config.toml"
    conf.write_text(text + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_settings(conf, {})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match="HORDE_CPU_THREADS: cpu_threads='many'"):
        load_settings(None, {"HORDE_CONFIG": "/nonexistent.toml", "HORDE_CPU_THREADS": "many"})
