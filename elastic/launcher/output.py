"""Worker output: every line prefixed by the worker's index, as horovodrun prefixes by rank."""

from __future__ import annotations

import os
import sys
import threading
from typing import IO, BinaryIO

_console_lock = threading.Lock()


def pump(stream: BinaryIO, index: int, kind: str, console: IO[str] | None,
         copy_to: str | None) -> threading.Thread:
    """Copy `stream` line by line to the console as `[index]<kind>:line` (and to a file).

    `console` is a text stream (default `sys.stdout`); bytes go to its binary buffer when
    it has one, and are decoded for those that have none (a notebook's streams).
    """

    def run() -> None:
        sink = open(copy_to, "ab") if copy_to else None  # noqa: SIM115 - closed below
        prefix = f"[{index}]<{kind}>:".encode()
        out = console if console is not None else sys.stdout
        raw = getattr(out, "buffer", None)
        try:
            for line in iter(stream.readline, b""):
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                text = prefix + line if line.endswith(b"\n") else prefix + line + b"\n"
                with _console_lock:
                    if raw is not None:
                        out.flush()  # what the launcher wrote as text goes first
                        raw.write(text)
                        raw.flush()
                    else:
                        out.write(text.decode("utf-8", "replace"))
                        out.flush()
        except (OSError, ValueError):
            pass
        finally:
            if sink is not None:
                sink.close()
            stream.close()

    thread = threading.Thread(target=run, name=f"horde-output-{index}-{kind}", daemon=True)
    thread.start()
    return thread


def output_paths(directory: str | None, index: int, width: int) -> tuple[str | None, str | None]:
    """`<dir>/rank.<index>/stdout` and `.../stderr` (index zero-padded), as horovodrun writes."""
    if not directory:
        return None, None
    folder = os.path.join(directory, f"rank.{index:0{width}d}")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
