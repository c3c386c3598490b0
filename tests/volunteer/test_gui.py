"""The Tk window under Xvfb, over a real agent: widgets show the agent's state and credit,
the pause button really pauses the agent, closing the window leaves the agent running.
A screenshot is saved as a test artifact ($HORDE_TEST_ARTIFACTS, else the test's folder).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from tests.volunteer.conftest import status, wait_for

pytestmark = pytest.mark.slow


def xwd_to_png(xwd: bytes) -> bytes:
    """A 24/32-bit TrueColor xwd dump (what `xwd -root` writes on Xvfb) as a PNG."""
    header = struct.unpack(">25I", xwd[:100])
    size, width, height = header[0], header[4], header[5]
    byte_order, bpp, stride, ncolors = header[7], header[11], header[12], header[19]
    if bpp != 32:
        raise ValueError(f"xwd with {bpp} bits per pixel is not supported")
    data = xwd[size + 12 * ncolors:]
    rows = bytearray()
    for y in range(height):
        line = data[y * stride: y * stride + width * 4]
        rows.append(0)
        for x in range(0, width * 4, 4):
            b, g, r = (line[x], line[x + 1], line[x + 2]) if byte_order == 0 else (
                line[x + 3], line[x + 2], line[x + 1])
            rows += bytes((r, g, b))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(rows), 6)) + chunk(b"IEND", b""))


@pytest.fixture
def display():
    """A private Xvfb display; skipped (with the reason) where Xvfb is not installed."""
    pytest.importorskip("tkinter", reason="Tk is not installed (apt-get install python3-tk)")
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb x11-apps)")
    number = 90 + os.getpid() % 500
    proc = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "800x600x24", "-nolisten",
                             "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = f":{number}"
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/tmp/.X11-unix/X{number}").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.skip("Xvfb did not start")
            time.sleep(0.1)
        yield f":{number}"
    finally:
        if saved is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = saved
        proc.terminate()
        proc.wait(10)


def test_window_shows_the_agent_and_pauses_it(volunteer_job, display, tmp_path):
    import tkinter as tk

    from volunteer_client.gui import VolunteerWindow

    vj = volunteer_job
    vj.sign("train.py", "--steps", "100000")
    vj.owner("train.py", "--steps", "100000")
    agent, data = vj.volunteer("gwen", "--yes")
    wait_for(lambda: status(data)["state"] == "training", 180,
             lambda: "gwen training: " + vj.log("gwen"))
    wait_for(lambda: status(data)["credit"] > 0, 120, "credit from the coordinator")

    root = tk.Tk()
    try:
        window = VolunteerWindow(root, data)
        window.refresh()
        root.update()
        assert window.state_label.cget("text") == "Training"
        assert vj.job in window.job_label.cget("text")
        assert "generation: " in window.job_label.cget("text")
        credit_text = window.credit_label.cget("text")
        assert credit_text.startswith("credit: ") and credit_text.split()[1] != "0"
        assert "no NVIDIA GPU" in window.usage_label.cget("text")
        assert window.pause_button.cget("text") == "Pause"
        assert window.entries["run_mode"].get() == "always"
        root.update()
        time.sleep(0.3)
        root.update()
        artifacts = Path(os.environ.get("HORDE_TEST_ARTIFACTS", tmp_path))
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run(["xwd", "-root", "-silent", "-display", display],
                              capture_output=True, timeout=30)
        if shot.returncode == 0:
            png = artifacts / "volunteer-gui.png"
            png.write_bytes(xwd_to_png(shot.stdout))
            assert png.stat().st_size > 1000
            print(f"screenshot: {png}")

        window.pause_button.invoke()  # a real click's command
        wait_for(lambda: status(data)["state"] == "paused" and not status(data)["devices"],
                 30, "the agent to pause")
        window.refresh()
        assert window.state_label.cget("text") == "Paused"
        assert "paused by you" in window.reason_label.cget("text")
        assert window.pause_button.cget("text") == "Resume"
    finally:
        root.destroy()
    assert agent.poll() is None  # closing the window does not stop the agent
    assert status(data)["state"] == "paused"
