"""`horde-volunteer gui`: a Tk window over the running agent.

It shows the agent's state (and why), the job, generation and rank, CPU/GPU use,
temperature and memory, samples and credit from the coordinator, and has a Pause/Resume
button, a Confirm button for a fresh install, and the main settings. It only talks to
the agent's loopback API: closing the window leaves the agent running ("Leave job"
stops it).
"""

from __future__ import annotations

import logging
import tkinter as tk
from pathlib import Path
from tkinter import ttk
from typing import Any

from volunteer_client.agent import AgentError, call_agent

logger = logging.getLogger(__name__)

REFRESH_MS = 1000
#: Settings the window edits: (setting, label).
EDITABLE = [("run_mode", "Run (always / idle)"), ("idle_minutes", "Idle minutes"),
            ("max_gpu_temp_c", "GPU temperature limit (°C)"),
            ("gpu_memory_fraction", "GPU memory cap (0-1)"),
            ("min_battery_percent", "Pause under battery %"),
            ("schedule", "Schedule (mon-fri 18:00-23:00; ...)")]


class VolunteerWindow:
    """The window; `refresh()` reads the agent, the buttons post to it."""

    def __init__(self, root: tk.Tk, data_dir: Path) -> None:
        self.root = root
        self.data_dir = data_dir
        self.status: dict[str, Any] = {}
        root.title("Horde volunteer")
        frame = ttk.Frame(root, padding=12)
        frame.grid(sticky="nsew")
        self.state_label = ttk.Label(frame, text="connecting to the agent...",
                                     font=("TkDefaultFont", 13, "bold"), wraplength=460)
        self.state_label.grid(row=0, column=0, columnspan=3, sticky="w")
        self.reason_label = ttk.Label(frame, text="", wraplength=460, foreground="#884400")
        self.reason_label.grid(row=1, column=0, columnspan=3, sticky="w")
        self.job_label = ttk.Label(frame, text="job: -")
        self.job_label.grid(row=2, column=0, columnspan=3, sticky="w", pady=(8, 0))
        self.usage_label = ttk.Label(frame, text="use: -", wraplength=460)
        self.usage_label.grid(row=3, column=0, columnspan=3, sticky="w")
        self.samples_label = ttk.Label(frame, text="samples: -")
        self.samples_label.grid(row=4, column=0, columnspan=3, sticky="w")
        self.credit_label = ttk.Label(frame, text="credit: -")
        self.credit_label.grid(row=5, column=0, columnspan=3, sticky="w")
        self.pause_button = ttk.Button(frame, text="Pause", command=self.toggle_pause)
        self.pause_button.grid(row=6, column=0, sticky="w", pady=8)
        self.confirm_button = ttk.Button(frame, text="Confirm job", command=self.confirm)
        self.confirm_button.grid(row=6, column=1, sticky="w", pady=8)
        self.leave_button = ttk.Button(frame, text="Leave job", command=self.leave)
        self.leave_button.grid(row=6, column=2, sticky="e", pady=8)
        settings = ttk.LabelFrame(frame, text="Settings", padding=8)
        settings.grid(row=7, column=0, columnspan=3, sticky="ew")
        self.entries: dict[str, ttk.Entry] = {}
        for row, (name, text) in enumerate(EDITABLE):
            ttk.Label(settings, text=text).grid(row=row, column=0, sticky="w")
            entry = ttk.Entry(settings, width=32)
            entry.grid(row=row, column=1, sticky="w")
            self.entries[name] = entry
        self.apply_button = ttk.Button(settings, text="Apply", command=self.apply_settings)
        self.apply_button.grid(row=len(EDITABLE), column=1, sticky="e")
        self.message_label = ttk.Label(frame, text="", foreground="#aa0000", wraplength=460)
        self.message_label.grid(row=8, column=0, columnspan=3, sticky="w")
        self._settings_loaded = False

    # -- reading the agent -------------------------------------------------------------

    def refresh(self) -> None:
        """Read the agent's status and show it."""
        try:
            st = call_agent(self.data_dir, "GET", "/status", timeout=3.0)
        except AgentError as exc:
            self.state_label.config(text="agent not running")
            self.reason_label.config(text=str(exc))
            self.pause_button.state(["disabled"])
            return
        self.status = st
        self.pause_button.state(["!disabled"])
        self.state_label.config(text=st["state"].capitalize())
        self.reason_label.config(text=st.get("reason") or "")
        ranks = ", ".join(f"rank {r}" for r in st.get("ranks", {}).values() if r is not None)
        gen = st.get("generation")
        self.job_label.config(text=f"job: {st['job']} on {st['coordinator']}   generation: "
                                   f"{gen if gen is not None else '-'}   {ranks or 'no rank'}")
        use = [f"worker CPU {st['cpu_percent']:.0f}%"]
        for gpu in st.get("gpus", []):
            use.append(f"GPU {gpu['index']} {gpu['name']}: {gpu['temp_c']} °C, "
                       f"{gpu['utilization']}% busy, {gpu['memory_used'] / 2**30:.1f}/"
                       f"{gpu['memory_total'] / 2**30:.1f} GiB")
        if not st.get("gpus"):
            use.append("no NVIDIA GPU: CPU only")
        self.usage_label.config(text="use: " + "; ".join(use))
        self.samples_label.config(text=f"samples credited: {st.get('credit', 0)} in "
                                       f"{st.get('contributions_accepted', 0)} contributions")
        self.credit_label.config(text=f"credit: {st.get('credit', 0)}   recent average: "
                                      f"{st.get('rac', 0.0):.1f}/day")
        self.pause_button.config(text="Resume" if st.get("user_paused") else "Pause")
        self.confirm_button.state(["disabled"] if st.get("confirmed") else ["!disabled"])
        if not self._settings_loaded:
            for name, entry in self.entries.items():
                value = st.get("settings", {}).get(name, "")
                entry.delete(0, tk.END)
                entry.insert(0, "; ".join(value) if isinstance(value, (list, tuple))
                             else str(value))
            self._settings_loaded = True

    def _post(self, path: str, body: dict[str, Any] | None = None) -> bool:
        try:
            call_agent(self.data_dir, "POST", path, body)
        except AgentError as exc:
            self.message_label.config(text=str(exc))
            return False
        self.message_label.config(text="")
        self.refresh()
        return True

    # -- buttons -------------------------------------------------------------------------

    def toggle_pause(self) -> None:
        self._post("/resume" if self.status.get("user_paused") else "/pause")

    def confirm(self) -> None:
        self._post("/confirm")

    def leave(self) -> None:
        self._post("/leave")

    def apply_settings(self) -> None:
        changes = {name: entry.get() for name, entry in self.entries.items()}
        self._post("/settings", changes)

    def poll(self) -> None:
        self.refresh()
        self.root.after(REFRESH_MS, self.poll)


def run_gui(data_dir: Path) -> int:
    """Open the window until it is closed (the agent keeps running)."""
    try:
        root = tk.Tk()
    except tk.TclError as exc:
        raise AgentError(f"cannot open a window: {exc} (is DISPLAY set?)") from None
    window = VolunteerWindow(root, data_dir)
    window.poll()
    root.mainloop()
    return 0
