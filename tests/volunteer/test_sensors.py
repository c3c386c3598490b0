"""Sensors: NVML facts through a stand-in `pynvml` (no NVIDIA GPU on CI), and the real
probes on this machine (no GPU, no battery: they say so instead of failing)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from volunteer_client import sensors


class NVMLError(Exception):
    pass


def fake_nvml(devices: list[dict], init_error: str | None = None) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's module with the calls GpuProbe makes."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError = NVMLError
    nv.NVML_TEMPERATURE_GPU = 0

    def init() -> None:
        if init_error:
            raise NVMLError(init_error)

    nv.nvmlInit = init
    nv.nvmlDeviceGetCount = lambda: len(devices)
    nv.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    nv.nvmlDeviceGetName = lambda h: h["name"].encode()
    nv.nvmlDeviceGetTemperature = lambda h, _kind: h["temp"]
    nv.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(total=h["total"], used=h["used"])
    nv.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=h["util"])
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [SimpleNamespace(pid=p)
                                                         for p in h["pids"]]
    return nv


def test_gpu_facts_count_only_other_programs(monkeypatch):
    devices = [{"name": "RTX 4090", "temp": 71, "total": 24 << 30, "used": 3 << 30,
                "util": 97, "pids": [100, 200, 300]},
               {"name": "RTX 3060", "temp": 45, "total": 12 << 30, "used": 0, "util": 0,
                "pids": []}]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices))
    probe = sensors.GpuProbe()
    gpus = probe.read(own_pids=[200])
    assert [g.name for g in gpus] == ["RTX 4090", "RTX 3060"]
    assert gpus[0].other_processes == 2 and gpus[1].other_processes == 0
    assert gpus[0].temp_c == 71.0 and gpus[0].memory_used == 3 << 30
    assert gpus[0].utilization == 97.0 and probe.note == ""


def test_no_driver_says_so_and_the_policy_runs_on_the_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml",
                        fake_nvml([], init_error="NVML Shared Library Not Found"))
    probe = sensors.GpuProbe()
    assert probe.read() == ()
    assert probe.note == ("no NVIDIA GPU or driver (NVML Shared Library Not Found); "
                          "running on the CPU")


def test_real_sensors_on_this_machine_never_fail():
    facts = sensors.Sensors().read()
    if not facts.gpus:
        assert facts.gpu_note  # says why there is no GPU
    assert facts.on_battery in (None, True, False)


def test_idle_probe_without_a_display_says_why(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    probe = sensors.IdleProbe()
    assert probe.idle_seconds() is None and "DISPLAY unset" in probe.note


@pytest.mark.parametrize("plugged, expected", [(True, False), (False, True), (None, None)])
def test_battery_states(monkeypatch, plugged, expected):
    battery = SimpleNamespace(percent=55.0, power_plugged=plugged)
    monkeypatch.setattr(sensors.psutil, "sensors_battery", lambda: battery)
    facts = sensors.Sensors().read()
    assert facts.on_battery is expected and facts.battery_percent == 55.0
