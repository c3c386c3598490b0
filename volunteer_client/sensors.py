"""The real sensors behind `policy.Facts`: psutil for the system, NVML for NVIDIA GPUs.

Every probe degrades to "unknown" with a reason instead of failing: a machine without an
NVIDIA driver says so and runs on the CPU; a desktop without X11 idle time says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Iterable

import psutil

from volunteer_client.policy import Facts, GpuFacts

logger = logging.getLogger(__name__)


class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [("window", ctypes.c_ulong), ("state", ctypes.c_int), ("kind", ctypes.c_int),
                ("til_or_since", ctypes.c_ulong), ("idle", ctypes.c_ulong),
                ("eventMask", ctypes.c_ulong)]


class IdleProbe:
    """Milliseconds since the last input on the X display (XScreenSaver extension)."""

    def __init__(self) -> None:
        self.note = ""
        self._display = None
        self._xss = self._x11 = None
        if not os.environ.get("DISPLAY"):
            self.note = "no X display (DISPLAY unset)"
            return
        x11_name, xss_name = ctypes.util.find_library("X11"), ctypes.util.find_library("Xss")
        if not x11_name or not xss_name:
            self.note = "libX11/libXss not installed"
            return
        try:
            self._x11 = ctypes.cdll.LoadLibrary(x11_name)
            self._xss = ctypes.cdll.LoadLibrary(xss_name)
            self._x11.XOpenDisplay.restype = ctypes.c_void_p
            self._xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(_XScreenSaverInfo)
            self._display = self._x11.XOpenDisplay(None)
        except OSError as exc:
            self.note = f"cannot load X11 libraries: {exc}"
            return
        if not self._display:
            self.note = "cannot open the X display"

    def idle_seconds(self) -> float | None:
        """Seconds since the last keyboard/mouse input (None: cannot tell)."""
        if not self._display or self._xss is None or self._x11 is None:
            return None
        info = self._xss.XScreenSaverAllocInfo()
        root = self._x11.XDefaultRootWindow(ctypes.c_void_p(self._display))
        ok = self._xss.XScreenSaverQueryInfo(ctypes.c_void_p(self._display), root, info)
        idle = info.contents.idle / 1000.0 if ok else None
        self._x11.XFree(info)
        return idle


class GpuProbe:
    """NVML: temperature, memory, utilisation and other programs' processes per GPU."""

    def __init__(self) -> None:
        self.note = ""
        self._nvml = None
        try:
            import pynvml
        except ImportError:
            self.note = "nvidia-ml-py is not installed; no GPU facts (running on the CPU)"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.note = f"no NVIDIA GPU or driver ({exc}); running on the CPU"
            return
        self._nvml = pynvml

    def read(self, own_pids: Iterable[int] = ()) -> tuple[GpuFacts, ...]:
        """Facts of every GPU; processes in `own_pids` (our workers) do not count as others."""
        nv = self._nvml
        if nv is None:
            return ()
        ours = set(own_pids)
        found = []
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            self.note = f"NVML cannot count GPUs: {exc}"
            return ()
        for index in range(count):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                name = nv.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else name
                temp = float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                try:
                    util = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
                except nv.NVMLError:
                    util = None
                try:
                    procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
                    others = sum(1 for p in procs if p.pid not in ours)
                except nv.NVMLError:
                    others = 0
                found.append(GpuFacts(index=index, name=str(name), temp_c=temp,
                                      memory_total=int(mem.total), memory_used=int(mem.used),
                                      utilization=util, other_processes=others))
            except nv.NVMLError as exc:
                logger.warning("NVML: GPU %d unreadable: %s", index, exc)
        if not found and not self.note:
            self.note = "NVML sees no GPU; running on the CPU"
        return tuple(found)


class Sensors:
    """Reads every fact the policy needs, once per poll."""

    def __init__(self) -> None:
        self.idle = IdleProbe()
        self.gpu = GpuProbe()

    def read(self, own_pids: Iterable[int] = ()) -> Facts:
        """One reading of every sensor (our own worker processes excluded)."""
        battery = None
        try:
            battery = psutil.sensors_battery()
        except (AttributeError, NotImplementedError, OSError):
            battery = None
        gpus = self.gpu.read(own_pids)
        return Facts(
            idle_seconds=self.idle.idle_seconds(),
            on_battery=(None if battery is None or battery.power_plugged is None
                        else not battery.power_plugged),
            battery_percent=None if battery is None else float(battery.percent),
            gpus=gpus, gpu_note=self.gpu.note if not gpus else "")
